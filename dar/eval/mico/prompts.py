"""Judge prompts for MICo-Bench's three judge questions.

These are our own texts following the published rubric (two 0-10 sub-scores for SC and
for PQ, a yes/no visibility question). A user who wants the official wording can pass a
YAML file with any of the keys ``sc``, ``pq``, ``visibility`` (see :func:`load_prompt_file`);
the reply parsers accept both our JSON answer format and the ``[score1, score2]`` list the
official texts ask for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

SC_PROMPT = """\
You will see two images. The first is a reference image that correctly contains every required element \
(people, objects, clothing, scene). The second is an AI-generated image that you must evaluate. \
All images, including any people in them, are AI-generated.

The generated image was made from this instruction:
{prompt}

Give two scores from 0 to 10:
1. Prompt following: how completely and accurately the second image follows the instruction \
(0 = ignores it, 10 = follows it perfectly).
2. Subject resemblance: how closely the people, objects, clothing and scene of the second image match \
those of the reference image (0 = no resemblance, 10 = every element closely matches).

Reply with a single JSON object and nothing else:
{"score": [<prompt following>, <subject resemblance>], "reasoning": "<one or two sentences>"}
"""

PQ_PROMPT = """\
You will see one AI-generated image. Judge only how well it is rendered, not what it shows.

Give two scores from 0 to 10:
1. Naturalness: does the scene look natural -- plausible lighting, shadows, distances and geometry \
(0 = clearly unnatural, 10 = fully natural)?
2. Artifacts: is the image free of distortions, malformed bodies or hands, blurred faces, watermarks, \
scratches, or pasted-looking subjects (0 = heavy artifacts, 10 = no artifacts)?

Reply with a single JSON object and nothing else:
{"score": [<naturalness>, <artifacts>], "reasoning": "<one or two sentences>"}
"""

VISIBILITY_PROMPT = """\
You will see two images. Image 1 is a source image showing one specific element (an object, a piece \
of clothing, an animal, or a scene). Image 2 is an AI-generated composite image.

Does the element shown in Image 1 appear in Image 2? Answer with exactly one word: yes or no.
"""


@dataclass(frozen=True)
class MicoPrompts:
    sc: str = SC_PROMPT
    pq: str = PQ_PROMPT
    visibility: str = VISIBILITY_PROMPT
    source: str = "default"

    def sc_for(self, prompt: str) -> str:
        # replace(), not format(): the texts contain literal JSON braces.
        return self.sc.replace("{prompt}", prompt)


def load_prompt_file(path: str | os.PathLike[str]) -> MicoPrompts:
    """Prompts from a YAML file with any of ``sc`` (must contain ``{prompt}``), ``pq``, ``visibility``."""
    source = Path(path)
    with open(source, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"prompt_file: {source} must be a YAML mapping with keys sc, pq, visibility")
    unknown = sorted(set(data) - {"sc", "pq", "visibility"})
    if unknown:
        raise ValueError(f"prompt_file: unknown keys {unknown} in {source}; expected sc, pq, visibility")
    for key, value in data.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"prompt_file: {key!r} in {source} must be non-empty text")
    if "sc" in data and "{prompt}" not in data["sc"]:
        raise ValueError(f"prompt_file: the 'sc' prompt in {source} must contain the {{prompt}} placeholder")
    return replace(MicoPrompts(), **data, source=str(source))
