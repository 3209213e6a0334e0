"""Videos of drives and dreams: the one place that writes .mp4 and .gif files.

    from video import Recorder, check_record_path, write_video
    check_record_path("drive.mp4")                 # before the drive, not after it
    write_video("dream.gif", frames, duration=80, loop=0)

Every file is encoded whole in memory first and renamed into place (presets.atomic_write): a drive killed
while its video is written leaves the old file or none, never a truncated one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from presets import atomic_write

FORMATS = (".mp4", ".gif")


def can_write_mp4() -> bool:
    """Whether imageio's ffmpeg plugin is installed (without it imageio picks another writer for .mp4 by the
    suffix and raises only once the drive is over)."""
    try:
        import imageio_ffmpeg  # noqa: F401  (imported only to see whether it is there)
    except ImportError:
        return False
    return True


def check_record_path(path: str) -> None:
    """Fail before driving, not after it: a .mp4 needs imageio-ffmpeg; other suffixes than .mp4 and .gif are
    not supported."""
    suffix = Path(path).suffix
    if suffix not in FORMATS:
        raise SystemExit(f"--record {path}: give a .mp4 or .gif path")
    if suffix == ".mp4" and not can_write_mp4():
        raise SystemExit(f"--record {path}: writing .mp4 needs imageio-ffmpeg (pip install 'imageio[ffmpeg]'), "
                         "or record a .gif")


def write_video(path: str | Path, frames, **options) -> None:
    """frames: uint8 [N,H,W,3] (or a list of [H,W,3]) -> `path`, the format by its suffix, atomically.
    options go to imageio's writer: fps for .mp4; duration (ms, one or per frame) and loop for .gif."""
    import imageio.v3 as iio
    data = iio.imwrite("<bytes>", np.stack(frames), extension=Path(path).suffix, **options)
    atomic_write(path, lambda f: f.write(data))


class Recorder:
    """Collects the env frames of a drive, with the chosen action and energy written on each."""

    def __init__(self, path: str, scale: int = 4):
        self.path, self.scale, self.frames = path, scale, []

    def __call__(self, obs: np.ndarray, action: np.ndarray, extras: dict) -> None:
        from PIL import Image, ImageDraw
        img = Image.fromarray(obs).resize((obs.shape[1] * self.scale, obs.shape[0] * self.scale), Image.NEAREST)
        draw = ImageDraw.Draw(img)
        text = f"steer {action[0]:+.2f} gas {action[1]:.2f} brake {action[2]:.2f}"
        if "energy" in extras:
            text += f"\nenergy {float(extras['energy']):+.2f}  plan {float(extras['plan_ms']):.0f} ms"
        draw.multiline_text((4, 4), text, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        self.frames.append(np.asarray(img))

    def save(self) -> None:
        if self.path.endswith(".gif"):
            write_video(self.path, self.frames[::2], duration=40, loop=0)          # 25 fps keeps GIFs small
        else:
            write_video(self.path, self.frames, fps=50)
