"""comfy-rapm: RAPM few-step distillation as ComfyUI nodes.

Inside ComfyUI this exports the pack's nodes. Imported anywhere else (no ComfyUI host) it exports
empty mappings, so tools that scan the repository do not fail."""
try:
    import comfy.model_management  # noqa: F401  only present inside a ComfyUI host
except ImportError:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
