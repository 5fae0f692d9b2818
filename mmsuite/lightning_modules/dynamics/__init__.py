"""Dynamics world model family: noise conventions, space-time transformer, training and sampling."""
