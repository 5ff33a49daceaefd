"""kit audit: what a run's or an ensemble's honest OOF predictions say about the data.

    summary = audit(Path("."), "effnet_lite0")    # writes audits/effnet_lite0/

Suspect labels (cleanlab's confident learning on the OOF probabilities), the class pairs the OOF
confuses most and merge candidates in `kit folds --merge-classes` format, near-duplicate pairs across
labels and across train/test, and contact sheets of each. Read-only advice: nothing else reads audits/.
"""

from kit.audit.run import AuditSummary, audit

__all__ = ["AuditSummary", "audit"]
