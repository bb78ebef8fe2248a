"""Pure builders: a resource's spec (+ operator settings) -> the child objects that run it.

No I/O, no clock, no randomness: the same input always gives the same objects, with
deterministic names and owner references. The operator applies them; `kubetune run` executes
the very same pod spec locally.
"""
