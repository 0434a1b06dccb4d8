"""The core: LoRA layers and variants, the adapter model, targeting, PEFT keys and factor arithmetic.

Imports only lorakit.errors, lorakit.io, lorakit.quant and lorakit.kernels; every command package
(train, serve, analysis, export, bench, demos) builds on it, never the other way round.
"""
