"""`esr ui`: review recorded sessions in a browser. server.py serves app.py
(Flask, on waitress) and keeps esr.index current; session.py reads one
session for its page."""
