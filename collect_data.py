"""Step 1c: random exploration data ("Chaos"): temporally correlated random driving.

    python collect_data.py                               # small preset -> ./data/*.npz
    python collect_data.py --preset full                 # the seed's ~1.5M frames

Actions are power-law coloured noise (smooth, persistent, unlike i.i.d. jitter that leaves the car
parked), steering and one longitudinal axis (gas forward, brake backward) with a forward bias, so the
car moves, leaves the road, spins, and crosses back. Re-running resumes.
"""
import numpy as np

from carenv import colored_noise, longitudinal_to_action
from collection import collector_parser, run_collection


class RandomExplorer:
    """Coloured-noise driver; sees nothing (no frame, no simulator)."""

    privileged = False

    def __init__(self, beta: float = 1.5, steer_scale: float = 0.7, forward_bias: float = 0.35,
                 lon_scale: float = 0.5, length: int = 512):
        self.beta, self.steer_scale, self.bias, self.lon_scale, self.length = \
            beta, steer_scale, forward_bias, lon_scale, length

    def reset(self, rng: np.random.Generator) -> None:
        noise = colored_noise(self.beta, (2, self.length), rng)          # [2, T]: steer, longitudinal
        self.actions = longitudinal_to_action(self.steer_scale * noise[0],
                                              self.bias + self.lon_scale * noise[1])   # [T, 3]
        self.t = 0

    def act(self, frame, sim):
        a = self.actions[self.t % self.length]
        self.t += 1
        return a, {}


def main(args):
    return run_collection("random", RandomExplorer, args)


if __name__ == "__main__":
    main(collector_parser("random", __doc__.splitlines()[0]).parse_args())
