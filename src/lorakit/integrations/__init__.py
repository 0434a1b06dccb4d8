"""Bridges to other training libraries (transformers.Trainer, TRL).

Above core, beside train: these modules use the LoraModel API only, never lorakit.train or
lorakit.serve.
"""
