"""A minimal HTTP service around ImageClassifier: python -m exporters.onnx.serve MODEL_DIR [--host 127.0.0.1]
[--port 8000] [--variant fp32] [--top 3] [--trust ROOT] [--max-bytes N]

  POST /predict   the body is one image file (PNG, JPEG, ...): 200 {"top": [{"label", "probability"}, ...]};
                  400 for a body that is not an image, 413 for one over --max-bytes (nothing is classified)
  GET  /health    200 {"variant", "labels", "verified"}: the model is loaded and its files were checked

The standard library's http.server (ThreadingHTTPServer: a thread per connection; ONNX Runtime's session.run is
safe to call from several threads): no dependency beyond serving's own (onnxruntime, numpy, PIL), which is why it
is here, and small enough to read whole. It has no TLS, authentication or request queue: put it behind the
reverse proxy your hospital already runs (nginx, a cloud load balancer) for those, or copy ImageClassifier into
the framework you use. The model's files are checked once, at start (--trust: signed by the project): a model
changed on disk afterwards is not served until a restart checks it again. The first line on stdout says where it
listens (`serving MODEL_DIR (VARIANT) on http://HOST:PORT`; --port 0 takes a free port). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, UnidentifiedImageError

from nvflare_lora.preprocessing import open_image

from .errors import ServingError
from .predict import ImageClassifier

MAX_BYTES = 20 * 1024 * 1024  # an image larger than this is refused (413) before it is read


def make_handler(classifier: ImageClassifier, top: int, max_bytes: int):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/health":
                return self._reply(404, {"error": f"no {self.path}: GET /health or POST /predict"})
            self._reply(200, {"variant": classifier.variant, "labels": classifier.labels,
                              "verified": classifier.verified})

        def do_POST(self):  # noqa: N802
            if self.path != "/predict":
                return self._reply(404, {"error": f"no {self.path}: POST /predict with an image file as the body"})
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._reply(411, {"error": "send the image with a Content-Length"})
            if size > max_bytes:
                return self._reply(413, {"error": f"the image is {size} bytes, above the service's limit of "
                                                  f"{max_bytes} (--max-bytes)"})
            body = self.rfile.read(size)
            try:
                image = open_image(io.BytesIO(body))  # training's decoding: complete, EXIF-oriented, RGB
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
                return self._reply(400, {"error": f"the body is not an image PIL can decode ({type(e).__name__}: "
                                                  f"{e}); send the file's bytes as they are"})
            best = classifier.top([image], k=top)[0]
            self._reply(200, {"top": [{"label": label, "probability": round(p, 6)} for label, p in best]})

        def log_message(self, format, *args):  # one line per request on stderr, as http.server does
            sys.stderr.write("%s %s\n" % (self.address_string(), format % args))

    return Handler


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exporters.onnx.serve", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", metavar="MODEL_DIR", help="what `python -m exporters.onnx` wrote")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed)")
    p.add_argument("--variant", default="fp32", help="fp32 (default), optimized, int8 or fp16, if exported")
    p.add_argument("--top", type=int, default=3, help="labels per image (default 3)")
    p.add_argument("--trust", metavar="ROOT", help="serve only an export signed by this project (predict's --trust)")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, help=f"largest image accepted (default {MAX_BYTES})")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.top < 1:
            raise ServingError(f"--top must be >= 1, got {args.top}")
        classifier = ImageClassifier(args.model_dir, args.variant, trust=args.trust)
        server = ThreadingHTTPServer((args.host, args.port), make_handler(classifier, min(args.top, len(
            classifier.labels)), args.max_bytes))
    except (ServingError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving {args.model_dir} ({args.variant}; {classifier.verified}) on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
