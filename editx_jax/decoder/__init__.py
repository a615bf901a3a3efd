"""The decoder: token pairs -> mel (flow matching) -> 24 kHz waveform (vocoder), and the prompt front end."""
