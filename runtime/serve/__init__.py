"""Live sessions: ``hallolive-rt serve`` (protocol.py: messages and events; sessions.py: LiveServer and
LiveSession, no web framework; app.py: FastAPI/WebSocket front and the page; launch.py: the command).
Importing this package needs no web framework: app.py (FastAPI) is imported only where it is used."""
