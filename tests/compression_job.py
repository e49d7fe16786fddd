"""Put compression filters into a copy of jobs/clip_lora (for the compression test and benchmark).

Filters of one task and direction form one chain, in order, so they are inserted into the job's own
chains: a receiver's decompressor goes first (the server's aggregator must see float32 tensors),
a sender's compressor last. The rewritten config is JSON, which is valid HOCON (comments are lost).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

CODEC = "nvflare_lora.fl.filters.compressor."
DECODER = "nvflare_lora.fl.filters.decompressor."


def codec_pair(mode: str, **args) -> Tuple[dict, dict]:
    """(compressor, decompressor) filter specs for nvflare_lora's codecs."""
    return ({"path": CODEC + "AdapterCompressor", "args": {"mode": mode, **args}},
            {"path": DECODER + "AdapterDecompressor", "args": {}})


def add_filter(config: Path, chain: str, task: str, spec: dict, first: bool) -> None:
    from pyhocon import ConfigFactory

    conf = ConfigFactory.parse_file(str(config)).as_plain_ordered_dict()
    chains = conf.setdefault(chain, [])
    for c in chains:
        if task in c["tasks"]:
            if list(c["tasks"]) != [task]:
                raise ValueError(f"{config.name}: {chain} chain {c['tasks']} is shared with other tasks")
            same = [i for i, f in enumerate(c["filters"]) if f.get("path") == spec["path"]]
            if same:  # the job already wires this filter (switched off): configure it in place
                c["filters"][same[0]] = spec
            else:
                c["filters"].insert(0 if first else len(c["filters"]), spec)
            break
    else:
        chains.append({"tasks": [task], "filters": [spec]})
    config.write_text(json.dumps(conf, indent=2) + "\n")


def add_compression(job: Path, upload: Optional[Tuple[dict, dict]] = None,
                    download: Optional[Tuple[dict, dict]] = None, task: str = "train") -> Path:
    """upload: sites' results (client compresses, server decompresses); download: the global model."""
    cfg = Path(job) / "app" / "config"
    client, server = cfg / "config_fed_client.conf", cfg / "config_fed_server.conf"
    if upload:
        add_filter(client, "task_result_filters", task, upload[0], first=False)
        add_filter(server, "task_result_filters", task, upload[1], first=True)
    if download:
        add_filter(server, "task_data_filters", task, download[0], first=False)
        add_filter(client, "task_data_filters", task, download[1], first=True)
    return Path(job)
