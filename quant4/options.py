"""The choices quant4 offers its users, in one place and importable without torch (the command-line tools
build their --help from these before anything heavy is imported)."""

GROUP_SIZES = (32, 64, 128, 256)            # inputs per scale and zero (quant4.scheme)
METHODS = ("rtn", "search", "refit")        # per-layer quantizers, no calibration (quant4.ops.quantize)
# What a model is quantized with when nobody says (quantize_model_, Int4Config, Quant4Config, the tools): the best
# calibration-free method at >= 50 M weights/s on 2 cores (README "Quality"). The per-tensor primitives
# (ops.quantize, Int4Linear.from_linear) keep "rtn", the scheme's plain rounding.
DEFAULT_METHOD = "refit"
MODEL_METHODS = ("rtn", "search", "refit", "gptq", "tune")   # how a model's layers can be quantized (gptq, tune: calibration text)
ACTIVATIONS = ("float", "int8", "bf16")     # what Int4Linear does with its inputs (quant4.ops)
