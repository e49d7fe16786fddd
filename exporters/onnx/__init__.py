"""ONNX export of a federated run: `python -m exporters.onnx RUN_DIR`, served by `python -m exporters.onnx.predict`.

Where each step lives:
  locate.py    find the global adapter checkpoint (best / latest) under a run directory
  rebuild.py   rebuild the base (fingerprint-checked), load the adapter, keep it unmerged, merge in fp32
  graph.py     the exported graphs (image: logits + image_embeds; text: text_embeds) and torch.onnx.export
  variants.py  optimized (ORT transformer fusions), int8 (dynamic quantization), fp16
  verify.py    ONNX Runtime vs the unmerged PEFT model on real images, with tolerances; latency
  pipeline.py  export_run: all of the above into a verified output directory
  session.py   every ONNX Runtime session: providers, and the int8 session entry where the CPU needs it
  triton.py    --triton: a Triton model repository of the verified files
  predict.py   the serving entry point: check the files' sha256, load, classify files/folders in batches
"""

from .errors import ExportError, VerificationError

__all__ = ["ExportError", "VerificationError", "export_run"]


def export_run(*args, **kwargs):
    """See exporters.onnx.pipeline.export_run."""
    # torch stays out of serving: exporters.onnx.predict imports this package, and must run without torch
    from .pipeline import export_run as run

    return run(*args, **kwargs)
