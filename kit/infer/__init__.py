"""The inference path shared by kit and the offline bundle (`kit bundle`), import-light on purpose.

kit predicts with these modules (`kit.train.timm_family.load_predictor`), and `kit bundle` embeds
their sources in `infer.py`, so a bundle computes what `kit submit` submits by construction. They
import only the standard library, numpy, torch, timm, safetensors and Pillow (transformers and peft
inside the functions of VLM members), plus kit's other import-light modules (errors, io, metrics,
preds, images, preprocess, train.runtime, ensemble.apply, ensemble.fusion_models; config and
vlm.model/inputs/features for VLM members): kit/bundle/embed.py checks that closure.

    predictor = TimmFold(timm_spec(config), Path("runs/tiny/fold0/model.safetensors"), device)
    logp = predictor(paths, workers=4)                     # [N, C] float32 log-probabilities
    logp = predict_tree(bundle["root"], paths, context)    # a whole run or ensemble, as kit submits it

predict_tree decodes each image once per input size for all the timm fold models and probe encoders
of the tree (streams.decode_once), and once for all the folds of a VLM member (their shared tower
outputs); `kit predict` takes the same path for a timm run.
"""
