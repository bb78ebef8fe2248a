"""kubetune's runtime: the program in the pod (train, evaluate, merge, publish).

Importing this package does no work; the training stack is imported only by the commands
that need it.
"""
