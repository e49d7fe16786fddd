"""python -m exporters.onnx RUN_DIR [--out DIR] [--checkpoint best|latest] [--model PATH] [--optimize]
[--quantize int8] [--fp16] [--opset N] [--with-text] [--data SOURCE] [--verify-samples N]
[--triton DIR [--triton-tensorrt] [--force]] [--wise ALPHA[,ALPHA...]] [--trust ROOT] [--allow-unverified]
[--sign KIT]

Exit status: 0 every requested file exported and verified; 1 a requested file failed its verification (it is not
written; the others are, unless fp32 itself failed: then nothing is); 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from . import graph
from .errors import ExportError, VerificationError
from .pipeline import export_run, export_wise

DESCRIPTION = ("Merge a federated run's global LoRA adapter into its base in fp32, export it to ONNX "
               "(pixel_values -> logits, image_embeds; dynamic batch), and verify it with ONNX Runtime against "
               "the unmerged PEFT model: a file that fails its check is not written.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exporters.onnx", description=DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="simulator workspace, server app dir, downloaded job, or a checkpoint directory")
    p.add_argument("--out", help="output directory (default RUN_DIR/onnx)")
    p.add_argument("--checkpoint", choices=["best", "latest"],
                   help="which global adapter (default: best; latest, with a note, when the run saved no best)")
    p.add_argument("--model", help="base model name or local HF directory, overriding the recorded one "
                                    "(its fingerprint must match the recorded base)")
    p.add_argument("--optimize", action="store_true", help="also write ONNX Runtime's fused transformer graph")
    p.add_argument("--quantize", choices=["int8"], help="also write an int8 dynamically quantized model (CPU serving: "
                                                         "signed weights, the same logits on every x86 CPU)")
    p.add_argument("--fp16", action="store_true", help="also write an fp16 model (GPU serving)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--with-text", action="store_true", help="also export the text tower + projection (zero-shot)")
    p.add_argument("--data", default="auto",
                   help="verification images: 'auto' (the run's validation images when the run directory holds "
                        "the sites' config, else digits), 'digits', an image folder, or a path,label CSV")
    p.add_argument("--verify-samples", type=int, default=256, help="images used for verification (default 256)")
    p.add_argument("--triton", metavar="DIR", help="also write a Triton Inference Server model repository (ONNX Runtime "
                                                   "backend) of the verified files into DIR")
    p.add_argument("--triton-tensorrt", action="store_true",
                   help="in the Triton repository, run the GPU models through ONNX Runtime's TensorRT accelerator (FP16)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --triton DIR")
    p.add_argument("--wise", metavar="ALPHA[,ALPHA...]",
                   help="WiSE-FT: merge ALPHA x the LoRA update (0: the zero-shot base, 1: the fine-tuned model) and "
                        "interpolate a zero-shot-started head likewise; a list writes OUT/wise_<ALPHA> for each")
    p.add_argument("--he-context", metavar="FILE",
                   help="a checkpoint of an encrypted (HE) job is decrypted with this site key: "
                        "a site's startup kit's startup/client_context.tenseal")
    p.add_argument("--trust", metavar="ROOT",
                   help="the project's rootCA.pem, or any startup kit of the project: the checkpoint must be signed by "
                        "the project's server (default: the startup kit whose folder holds the checkpoint, if any)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="export a checkpoint without a manifest or signature (never one that contradicts them)")
    p.add_argument("--sign", metavar="KIT",
                   help="sign export_report.json (every file's sha256) with this startup kit's key (a site's), for "
                        "`predict --trust ROOT`")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        options = dict(out=args.out, checkpoint=args.checkpoint, model=args.model, optimize=args.optimize,
                       quantize=args.quantize, fp16=args.fp16, opset=args.opset or graph.DEFAULT_OPSET,
                       with_text=args.with_text, data=args.data, samples=args.verify_samples, triton=args.triton,
                       triton_tensorrt=args.triton_tensorrt, force=args.force, he_context=args.he_context,
                       trust=args.trust, allow_unverified=args.allow_unverified, sign=args.sign)
        alphas = None if args.wise is None else [a.strip() for a in args.wise.split(",")]
        if alphas is not None and len(alphas) > 1:
            export_wise(args.run_dir, alphas, **options)
        else:
            export_run(args.run_dir, wise=alphas and alphas[0], **options)
    except (ExportError, VerificationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
