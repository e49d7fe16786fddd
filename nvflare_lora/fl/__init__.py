"""NVFlare components of nvflare_lora; job configs name them by import path, e.g.
nvflare_lora.fl.executor.CLIPLoRAExecutor, so sites need no custom/ code."""
