"""Voice: speech out (Piper TTS, espeak-ng fallback, SSML subset, pronunciation lexicon) and speech in."""
