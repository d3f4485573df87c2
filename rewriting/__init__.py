"""The rewriting engine: edit one layer of a pretrained generator as a linear
associative memory (Bau et al., "Rewriting a Deep Generative Model", ECCV 2020).

Torch-only. Modules (imported explicitly; this package imports nothing itself, so
that ``rewriting.requests`` can be used without loading torch):

- ``layers``: reach a layer by name, trace keys and values, replay it with another weight.
- ``seeds``: latents from integer seeds.
- ``statistics``: the keys' float64 second moment, mergeable and saved as safetensors.
- ``directions``: covariance-adjusted keys, ZCA whitening, context directions from masks.
- ``insert``: find the low-rank weight change (projected Adam, lambda-only Adam, closed form).
- ``delta``: edits as low-rank deltas; apply, compose, remove, materialize.
- ``checkpoint``: safetensors model files.
- ``requests``, ``values``, ``edit``, ``render``, ``metrics``, ``cli``: the edit front end.

See docs/engine.md.
"""
