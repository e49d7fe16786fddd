"""What the tests and the benchmarks share: the real system, run on this machine.

- `simulator`: copies of the shipped job (written by the schema's writer, some settings changed) run in the
  real NVFlare simulator, and readers of what the run leaves behind;
- `faults`: a faulty site, a subclass of the real executor that corrupts its own update in chosen rounds, and
  the in-process round's channel that does the same;
- `floor`: an executor that answers every task at once, to measure what NVFlare itself costs per task;
- `ort_logits`: an exported model's logits as a script (`python -m nvflare_lora.testing.ort_logits`), light
  enough to run under CPU emulation.

Job configs name these classes by their package path (nvflare_lora.testing.faults.FaultyExecutor), which
resolves in every simulator and POC process, as the package is installed. The helpers read the repository
checkout (jobs/, deploy/), so they serve a clone, not an installed wheel.

This is the top layer: it may import anything of nvflare_lora and exporters; nothing in them imports it.
Helpers only the tests use are in tests/support/, those only the benchmarks use in benchmarks/_*.py.
"""
