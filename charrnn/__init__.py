"""Shared core of the char-rnn service: the model, vocabulary, checkpoint format and sampling."""
