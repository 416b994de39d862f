"""HAMT, the plain model: ``binding`` (bipolar / FFT binding), ``memory`` (the slot memory and
its chunked scan), ``model`` (``HAMTConfig``, ``HAMTModel``)."""
