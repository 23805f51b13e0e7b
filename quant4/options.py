"""The choices quant4 offers its users, in one place and importable without torch (the command-line tools
build their --help from these before anything heavy is imported)."""

GROUP_SIZES = (32, 64, 128, 256)            # inputs per scale and zero (quant4.scheme)
METHODS = ("rtn", "search", "refit")        # per-layer quantizers, no calibration (quant4.ops.quantize)
MODEL_METHODS = ("rtn", "search", "refit", "gptq", "tune")   # how a model's layers can be quantized (gptq, tune: calibration text)
ACTIVATIONS = ("float", "int8", "bf16")     # what Int4Linear does with its inputs (quant4.ops)
