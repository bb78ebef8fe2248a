"""Data: read rows, map each format to conversations, tokenize and pack."""
