"""`streamgen serve`: HTTP signaling, WebRTC peers and tracks, the control protocol, session lifecycle."""
