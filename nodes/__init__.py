"""ComfyUI glue: widgets → calls into comfy_rapm, progress, errors. No math here; one module per node group."""
from .demo import RAPMEmojiDemoLoader
from .sampling import RAPMSampler
from .training import RAPMSaveLoRA, RAPMTrain
from .trajectories import RAPMLoadTrajectories, RAPMTeacherTrajectory

NODE_CLASS_MAPPINGS = {
    "RAPMSampler": RAPMSampler,
    "RAPMTeacherTrajectory": RAPMTeacherTrajectory,
    "RAPMLoadTrajectories": RAPMLoadTrajectories,
    "RAPMTrain": RAPMTrain,
    "RAPMSaveLoRA": RAPMSaveLoRA,
    "RAPMEmojiDemoLoader": RAPMEmojiDemoLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RAPMSampler": "RAPM Sampler",
    "RAPMTeacherTrajectory": "Teacher Trajectories (RAPM)",
    "RAPMLoadTrajectories": "Load Trajectories (RAPM)",
    "RAPMTrain": "RAPM Train",
    "RAPMSaveLoRA": "LoRA Save (RAPM)",
    "RAPMEmojiDemoLoader": "Emoji Demo Teacher (RAPM)",
}
