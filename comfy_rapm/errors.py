"""Errors a user can act on: they name the node, the input, the value and what to do."""


class NodeInputError(ValueError):
    def __init__(self, node: str, input_name: str, message: str):
        self.node, self.input_name = node, input_name
        super().__init__(f"{node}: input '{input_name}': {message}")
