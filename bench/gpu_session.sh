#!/usr/bin/env bash
# One device call, from a checkout whose `.gpu-demo/` was built by `python bench/gpu_carry.py` and carried:
#
#   bash bench/gpu_session.sh tests check e2e-kit     # the GPU tests, the GPU check, kit's e2e side (~8 min)
#   bash bench/gpu_session.sh e2e                     # bench_e2e case (a), kit against the hand loop (~4 min)
#   bash bench/gpu_session.sh demo                    # kit demo --recipe gpu (~8 min)
#   SWEEP="l0_e10 l0_e20_mix" bash bench/gpu_session.sh sweep   # bench/demo_sweep.py, 4 variants at a time
#   bash bench/gpu_session.sh first-step              # bench/first_step.py's variants (~1 min)
#   bash bench/gpu_session.sh bundle                  # bench/bench_bundle.py on CUDA: infer.py against kit predict
#   bash bench/gpu_session.sh parts                   # bench/predict_parts.py: a prediction batch's GPU time (~1 min)
#   bash bench/gpu_session.sh e2e-b                   # bench_e2e case (b): 25k JPEGs, convnext_base@384 (~5 min)
#
# Steps run in the order given; each writes what it printed to $OUT/<step>.txt (the device tool returns
# $OUT) as it goes, so a call cut short by its limit still returns what finished. GPU_CHECK_LIMIT (photos
# for the GPU check, default 1200) shortens it.
set -uo pipefail
for step in "$@"; do  # every step named right before any runs
    case "$step" in tests|check|e2e|e2e-kit|e2e-b|demo|sweep|first-step|bundle|parts) ;; *) echo "gpu_session: unknown step $step (tests, check, e2e, e2e-kit, e2e-b, demo, sweep, first-step, bundle, parts)"; exit 2 ;; esac
done
source "$(dirname "$0")/../.gpu-demo/env.sh"
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())" >> "$OUT/device.txt"

# the files holding GPU tests (the other test modules import packages the GPU machine lacks: bitsandbytes, ...)
GPU_TESTS=(tests/test_tta_views.py tests/test_probe_logreg.py tests/test_host_copies.py tests/test_cuda_graph.py
    tests/test_cudnn_warmup.py tests/test_graphed_forward.py tests/test_bundle_rates.py tests/test_loss_readout.py
    tests/test_pillow_resize.py tests/test_autocast_weights.py tests/test_feed.py)

for step in "$@"; do
    start=$(date +%s)
    case "$step" in
        tests) python -m pytest -q -s -p no:cacheprovider -m gpu "${GPU_TESTS[@]}" ;;
        check) python bench/gpu_check.py --work /tmp/gc --limit "${GPU_CHECK_LIMIT:-1200}" ;;
        # kit_stderr.txt: kit's stderr, each line after its seconds since the start (where the start-up went)
        e2e) python bench/bench_e2e.py --case elpv --work /tmp/e2e --out "$OUT/e2e.json" \
            && cp /tmp/e2e/elpv/kit_stderr.txt "$OUT/e2e.kit_stderr.txt" ;;
        e2e-kit) python bench/bench_e2e.py --case elpv --kit-only --work /tmp/e2e-kit --out "$OUT/e2e-kit.json" \
            && cp /tmp/e2e-kit/elpv/kit_stderr.txt "$OUT/e2e-kit.kit_stderr.txt" ;;
        e2e-b) python bench/bench_e2e.py --case jpegs --work /tmp/e2e-b --out "$OUT/e2e-b.json"; rc=$?
            cp /tmp/e2e-b/jpegs/kit_stderr.txt "$OUT/e2e-b.kit_stderr.txt"; (exit $rc) ;;
        parts) python bench/predict_parts.py --model efficientnet_lite0 --folds 5 --rows ${PARTS_ROWS:-64 128 256} --stream-workers ${STREAM_WORKERS:-16 12 8} ;;
        # infer.py against kit predict: 5 lite0 folds, flip TTA, 8,192 512x384 JPEGs (issue 15's >= 2,000 images/s)
        bundle) python bench/bench_bundle.py --device cuda --model efficientnet_lite0 --folds 5 --images 8192 \
            --rounds 3 --batch-size "${BUNDLE_BATCH:-64}" --decode-workers ${DECODE_WORKERS:-} ${BUNDLE_ARGS:-} ;;
        # a fresh process's first lite0 step under layouts and precisions (cuDNN's run-time compiled kernels)
        first-step) python bench/first_step.py --procs 1 --variants ${FIRST_STEP:-default thread_warm fp32 nchw nchw_fp32} ;;
        # the members' and the ensemble's OOF come back too (bench/oof_breakdown.py reads them)
        demo) python -m kit.cli demo --recipe gpu --root /tmp/demo; rc=$?
            (cd /tmp/demo && tar czf "$OUT/demo_oof.tgz" folds runs/*/oof.npz runs/*/*.json ensembles/*/oof.npz ensembles/*/recipe.json); (exit $rc) ;;
        # shellcheck disable=SC2086  # SWEEP is a list of variant names
        sweep) python bench/demo_sweep.py --root /tmp/sweep --parallel "${SWEEP_PARALLEL:-4}" \
            --budget "${SWEEP_BUDGET:-330}" --out "$OUT/sweep.json" ${SWEEP:+--only $SWEEP}; rc=$?
            # the variants' OOF too: paired comparisons over the same rows (bench/oof_breakdown.py)
            (cd /tmp/sweep && tar czf "$OUT/sweep_oof.tgz" folds runs/*/oof.npz runs/*/*.json); (exit $rc) ;;
    esac > "$OUT/$step.txt" 2>&1
    echo "$step: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
    tail -3 "$OUT/$step.txt"
done
