"""One mode's rollout process of ``fkv bench`` (:func:`.rollouts.serve`): compiled, then answering the parent."""

import json
import sys

from .rollouts import serve
from .settings import BenchSettings

serve(BenchSettings(**json.loads(sys.argv[1])), sys.argv[2])
