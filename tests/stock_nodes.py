"""Test helper: call a stock ComfyUI node whichever node API its host release gives it."""


def call(node_class, *args):
    """The node's outputs as a tuple: V3 nodes (0.3.6x on) have an `execute` classmethod that returns a NodeOutput;
    classic nodes (and every node of older hosts) a FUNCTION method that returns a tuple, or a dict with "result"."""
    if hasattr(node_class, "define_schema"):
        return tuple(node_class.execute(*args).args)
    out = getattr(node_class(), node_class.FUNCTION)(*args)
    return tuple(out.get("result", ()) if isinstance(out, dict) else out)
