"""NVFlare components of nvflare_lora, one per file, by role. Job configs name them by import path
(e.g. nvflare_lora.fl.site.executor.CLIPLoRAExecutor), so sites need no custom/ code.

One round (docs/architecture.md has the same sequence, with the in-process round that mirrors it):

  server  server/persistor.py           AdapterPersistor: the global adapter (never the base), checkpoints
          server/shareable_generator.py AdapterShareableGenerator: global adapter -> WEIGHTS DXO, with the
                                        job's facts announced in its meta, at each site's rank
          filters/compressor.py         AdapterCompressor (optional, task data): encode the download
  site    filters/decompressor.py       AdapterDecompressor: decode
          site/executor.py              CLIPLoRAExecutor -> nvflare_lora.site.Site: load the global adapter,
                                        evaluate it, train, build the update (local - global, WEIGHT_DIFF)
          filters/compressor.py         AdapterCompressor (optional, task result): encode the upload
  server  filters/decompressor.py       AdapterDecompressor: decode
          server/aggregator.py          LoRAAggregator: check each update against the one spec, combine by
                                        the rule (fedavg / ffa / exact), bounded; optional DP-FedAvg noise
          server/workflow.py            ResumableScatterAndGather: the rounds, resume, stop on a fatal site
          server/communication_log.py   CommunicationLog: bytes, metrics, refusals -> communication.json
          server/model_locator.py       AdapterModelLocator: best/latest for cross-site evaluation
  protocol.py: the DXO meta keys both sides use.
"""
