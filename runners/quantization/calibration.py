"""Built-in GPTQ calibration texts: varied everyday English, prose and dialogue.

GPTQ only needs activations that look like what the model will see; a few dozen
paragraphs are enough for a small model (AutoGPTQ's examples use 128 samples of C4).
These are written for this project, and differ from the perplexity text of
``bench/quantization.py`` so the benchmark does not score on its calibration data.
"""

from __future__ import annotations

from openllm_clone.errors import InvalidRequestError

__all__ = ["BUILTIN_TEXTS", "load_calibration"]

BUILTIN_TEXTS = [
    "The market opens at seven, before the heat. Farmers unload crates of tomatoes, "
    "onions and peppers, and the first customers argue gently about prices.",
    "User: Can you help me write an email to my landlord about the broken heater?\n"
    "Assistant: Of course. Start with the date you noticed the problem, describe what "
    "happens, and ask when a technician can come.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The "
    "green pigment chlorophyll absorbs red and blue light and reflects green.",
    "To reset the router, hold the small button on the back for ten seconds until the "
    "lights blink, then wait two minutes for it to start again.",
    "In 1869 the first transcontinental railroad in the United States was completed, "
    "cutting the journey from coast to coast from months to about a week.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])",
    "Dear team, thank you for your work this quarter. Sales grew by twelve percent and "
    "customer complaints fell by a third. Let us keep the same focus next quarter.",
    "The recipe needs two cups of flour, one teaspoon of salt, a spoon of sugar, yeast "
    "and warm water. Knead the dough for ten minutes and let it rise for an hour.",
    "A black hole forms when a massive star collapses under its own gravity. Nothing, "
    "not even light, escapes from inside its event horizon.",
    "User: What is the difference between a virus and a bacterium?\nAssistant: Bacteria "
    "are living cells that can reproduce on their own; viruses need a host cell.",
    "The committee met on Tuesday to discuss the new budget. After a long debate, the "
    "members agreed to fund the library renovation and delay the parking project.",
    "She opened the old letter carefully. The ink had faded, but she could still read "
    "her grandmother's neat handwriting describing the harbour in winter.",
    "Regular exercise improves sleep, mood and memory. Even a brisk thirty-minute walk "
    "five days a week lowers the risk of heart disease.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = "
    "orders.customer_id GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "The river flooded twice that spring. Volunteers filled sandbags along the bank, "
    "and the town opened the school gym for families who had to leave their homes.",
    "Machine learning models learn patterns from examples instead of following rules "
    "written by hand. The more varied the examples, the better they generalise.",
    "Q: How many minutes are in a day?\nA: There are 24 hours in a day and 60 minutes in "
    "an hour, so 24 times 60 gives 1440 minutes.",
    "The museum's new exhibition shows tools, pottery and jewellery from a Bronze Age "
    "village discovered during the construction of a highway.",
    "Please keep your luggage with you at all times. Unattended bags may be removed and "
    "destroyed by security. Thank you for travelling with us.",
    "Volcanic soil is rich in minerals, which is why farms often cover the slopes of "
    "active volcanoes despite the danger of eruptions.",
    "He missed the last bus and walked home through the quiet streets, counting the "
    "lit windows and wondering who was still awake at that hour.",
    "To convert Celsius to Fahrenheit, multiply by nine, divide by five and add "
    "thirty-two. Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit.",
    "The company will release the update next week. It fixes the login problem, speeds "
    "up search and adds a dark mode that many users asked for.",
    "Bees communicate the direction and distance of flowers with a waggle dance; the "
    "angle of the dance shows the direction relative to the sun.",
]


def load_calibration(source: str) -> list[str]:
    """``builtin``, or a text file: paragraphs separated by blank lines (or JSON lines
    with a ``text`` field)."""
    if source == "builtin":
        return list(BUILTIN_TEXTS)
    import json
    from pathlib import Path

    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {source!r} does not exist (or use 'builtin')")
    raw = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise InvalidRequestError(f"calibration file {source!r} has no text")
    return texts
