"""`lorakit merge`: the merged model as a transformers checkpoint (merge.py) or one GGUF file (gguf.py)."""
