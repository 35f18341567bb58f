"""The voice library: what a voice leaf is built from (audio, VAD, STT, agents, TTS, rooms,
shared inference) and the hosting of LiveKit Agents apps."""
