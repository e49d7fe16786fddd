"""The two ways an export stops: bad input (exit 2) and a failed verification (exit 1)."""


from nvflare_lora.errors import NVFlareLoRAError


class ExportError(NVFlareLoRAError):
    """Something the user supplied is missing or wrong: the message says what and what to do."""

    exit_code = 2


class VerificationError(NVFlareLoRAError):
    """The exported model does not compute what the unmerged PEFT model computes, by the stated amount. A
    NVFlareLoRAError like every refusal of this package, but not an ExportError: it exits 1, not 2."""

    exit_code = 1


class ServingError(NVFlareLoRAError):
    """An exported model directory or a prediction input that cannot be served as it is: the message says what
    and what to do (exit 2)."""

    exit_code = 2
