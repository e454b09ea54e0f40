"""Code that runs without unialign: copied verbatim into exported sentence-transformers folders.

Each module here imports only torch, numpy, PIL and its siblings (``st_modules`` also
sentence-transformers, safetensors and, lazily, the backbone libraries), and unialign itself imports
its heads, maps, image transform and pooling from here, so an export runs the same code as unialign,
not a second implementation. This ``__init__`` imports nothing, so importing one of them stays cheap.
"""
