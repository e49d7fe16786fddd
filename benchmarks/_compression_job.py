"""A job variant whose train-task filters are not nvflare_lora's codecs (benchmarks/compression.py compares
NVFlare's own ModelQuantizer with them).

nvflare_lora's codecs need no helper: they are settings (nvflare_lora.testing.simulator.make_job(dest,
compression="topk+int8", download_compression="int8", compression_args={"fraction": 0.1})). Other filters take
the place of the job's own AdapterCompressor / AdapterDecompressor in the train task's chains, in the config dicts
the schema's writer writes (nvflare_lora.settings), never by editing config text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from nvflare_lora.settings import settings

from nvflare_lora.jobfolder import COMPRESSOR, DECOMPRESSOR, client_config, meta, server_config, write_configs

Pair = Tuple[Dict, Dict]  # (sender's filter spec, receiver's filter spec): {"path": ..., "args": {...}}


def _replace(config: Dict, chain: str, path: str, spec: Dict, task: str = "train") -> None:
    for c in config[chain]:
        if task in c["tasks"]:
            slots = [i for i, f in enumerate(c["filters"]) if f["path"] == path]
            if len(slots) != 1:
                raise ValueError(f"{chain} of {task!r} holds {len(slots)} filters {path}, expected 1")
            c["filters"][slots[0]] = spec
            return
    raise ValueError(f"no {chain} chain for task {task!r}")


def job_with_filters(dest: Path, upload: Optional[Pair] = None, download: Optional[Pair] = None,
                     **changes) -> Path:
    """The default job with some settings changed (simulator.make_job's keywords), written to `dest`, with
    upload: the sites' results (the site's filter, then the server's) and download: the global model (the
    server's filter, then the site's) in place of the job's compressor and decompressor."""
    s = settings(**changes)
    server, client = server_config(s), client_config(s)
    if upload:
        _replace(client, "task_result_filters", COMPRESSOR, upload[0])
        _replace(server, "task_result_filters", DECOMPRESSOR, upload[1])
    if download:
        _replace(server, "task_data_filters", COMPRESSOR, download[0])
        _replace(client, "task_data_filters", DECOMPRESSOR, download[1])
    return write_configs(Path(dest), meta(Path(dest).name, s), server, client)
