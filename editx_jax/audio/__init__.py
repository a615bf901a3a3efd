"""Ground floor for audio: `io.py` (reading, mono, peak cap, resampling, trim, clip preparation) and
`features.py` (Kaldi fbank + LFR + CMVN, whisper log-mel, Slaney mel filters). Both are numpy / jax
only and import nothing of ours but config/; the tokenizer, the decoder and the CLIs import them
directly (`from editx_jax.audio.io import load_audio`), so this file re-exports nothing.
"""
