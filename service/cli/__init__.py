"""The `nlg` command line: the parser, the commands, and the tensor-parallel launcher."""
