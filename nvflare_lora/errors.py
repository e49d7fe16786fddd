"""The one base class of this package's errors.

Every error raised for bad input (settings, files, updates, data) is a NVFlareLoRAError, itself a
ValueError, so `except NVFlareLoRAError` catches exactly what this package refuses, and code that
caught ValueError before still does. Each message names what is wrong and what to do.
"""


class NVFlareLoRAError(ValueError):
    """Bad input refused by nvflare_lora: the message names the thing and the fix."""


class ModelNotFoundError(NVFlareLoRAError):
    """The base model cannot be had or used: not a preset, not a directory, not reachable on a hub, or of a family
    this package does not support (nvflare_lora.families.FamilyError)."""
