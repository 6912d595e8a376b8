"""A small but real CLIP tokenizer folder (`vocab.json`, `merges.txt`), learned here since we cannot download one.

The learner follows CLIP's conventions: the byte-level alphabet of `bytes_to_unicode` (transformers' copy, not ours),
each byte symbol and its `</w>` end-of-word variant first in the vocabulary, then one token per merge, then
`<|startoftext|>` and `<|endoftext|>`; `merges.txt` starts with the `#version: 0.2` header.
"""

import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import regex
from transformers.convert_slow_tokenizer import bytes_to_unicode

CORPUS = """
A photo of an astronaut riding a horse on Mars, highly detailed, digital art, trending on artstation.
A cozy cabin in the snowy mountains at night, warm light glowing through the windows, cinematic lighting.
Portrait of an old fisherman with a gray beard, wrinkled skin, dramatic shadows, oil painting by a master.
A bowl of ramen with a soft-boiled egg, steam rising, food photography, shallow depth of field, 85mm lens.
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
An ancient library filled with dusty books and floating candles; magical atmosphere, volumetric fog.
A futuristic city skyline at sunset, flying cars, neon signs reflected in the wet streets, cyberpunk style.
Watercolor painting of a lighthouse on a rocky coast, waves crashing, seagulls in the sky.
A cute corgi puppy wearing sunglasses, sitting on a beach towel, summer vibes, 4k, ultra realistic.
Isometric view of a tiny island with palm trees and a wooden hut, low poly, pastel colors.
It's a beautiful day, isn't it? They're going to the market, we've got lots of time, I'm sure you'll love it.
She'd say that the painting's colors are too bright; he'd disagree. Don't worry, it'll be fine.
A close-up of a dewdrop on a green leaf, macro photography, bokeh background, morning light.
The café served crème brûlée and a croissant; the naïve façade of the old hôtel looked déjà vu.
Ein schöner Garten mit blühenden Blumen. Über den Wolken muss die Freiheit wohl grenzenlos sein.
El niño comió una manzana en la mañana. ¿Dónde está la biblioteca? ¡Qué bonito día!
Tokyo street at night: 東京の夜景, ラーメン屋, 桜の花. Beijing: 北京烤鸭, 长城. Seoul: 서울의 밤.
Emoji moods: 🚀 launch, 🔥 fire, 😀 happy, 🌸 blossom, 🐱 cat, ❤️ love, 👍 thumbs up.
A steampunk airship made of brass and copper, gears and pipes, clouds, epic scale, matte painting.
Minimalist logo of a mountain and a sun, flat vector, white background, simple geometric shapes.
A knight in shining armor fighting a dragon, fantasy illustration, dynamic pose, sparks and embers.
A still life with apples, pears and grapes on a wooden table, Dutch golden age, chiaroscuro.
Underwater scene with coral reefs, tropical fish, sunbeams piercing the water, national geographic.
A robot reading a newspaper in a Parisian café, retro style, 1950s, film grain, Kodak Portra 400.
Numbers and symbols: 1, 2, 3, 10, 42, 100, 2024, 3.14, 50%, $20, #1, @home, a+b=c, x*y, (1/2).
A red sports car drifting on a mountain road, motion blur, golden hour, automotive photography.
A small village in the Alps, wooden chalets, cows grazing in the meadow, snow-capped peaks.
Anime style girl with long blue hair, school uniform, cherry blossoms, studio ghibli inspired.
A dark forest with glowing mushrooms, fireflies, mysterious path, fairy tale, concept art.
A vintage typewriter on a desk next to a cup of coffee and a stack of letters, soft window light.
Abstract composition of colorful shapes and lines, Bauhaus, Kandinsky, geometric balance.
A majestic lion resting on a rock in the savanna, golden mane, wildlife photography, telephoto.
A spaceship interior with holographic displays, crew members working, science fiction, sharp focus.
Best quality, masterpiece, ultra detailed, 8k wallpaper, intricate details, hyperrealistic, HDR.
Low quality, blurry, jpeg artifacts, watermark, text, signature, deformed hands, extra fingers.
A rainy afternoon in London, red double-decker bus, umbrellas, reflections on the pavement.
A golden retriever catching a frisbee in a park, action shot, high shutter speed, vivid colors.
The Eiffel Tower under a starry sky, Van Gogh style, swirling brushstrokes, impressionism.
A medieval market square bustling with merchants, jugglers and musicians, Renaissance painting.
Hand-drawn sketch of a cat sleeping on a windowsill, pencil on paper, cross-hatching.
In the beginning, the engineers built a small prototype, tested every component twice and wrote careful notes.
Scientists discovered that octopuses can solve puzzles, open jars and even recognize individual human faces.
The orchestra tuned their violins, cellos and trumpets while the conductor adjusted his spectacles nervously.
Yesterday we hiked through the canyon, crossed a shallow river and camped beneath enormous sequoia trees.
Grandmother's recipe requires flour, butter, cinnamon, nutmeg, vanilla extract and a pinch of sea salt.
Architects designed the museum with curved glass walls, cantilevered terraces and a spiraling staircase.
Thunderstorms rolled across the prairie; lightning illuminated abandoned barns, windmills and wheat fields.
The marathon runners sprinted past cheering crowds, volunteers handing out water bottles and orange slices.
Quantum computers manipulate qubits using superposition and entanglement to accelerate certain algorithms.
Beekeepers harvest honey in late summer, wearing protective veils, gloves and smoking the hives gently.
A mischievous raccoon knocked over the garbage cans, scattering pizza boxes, banana peels and newspapers.
Volcanic eruptions release ash, sulfur dioxide and molten lava that slowly reshapes the surrounding landscape.
The detective examined fingerprints, footprints and a torn envelope hidden behind the grandfather clock.
Gardeners prune roses in early spring, fertilize tomatoes, and protect lettuce from hungry snails and slugs.
Astronomers photographed a distant galaxy whose spiral arms glitter with millions of newborn stars.
The bakery sells sourdough loaves, blueberry muffins, chocolate eclairs and raspberry tarts every morning.
Penguins waddle across the Antarctic ice, dive into freezing water and hunt krill, squid and silverfish.
Skateboarders practiced kickflips, ollies and grinds at the concrete park near the abandoned warehouse.
A jazz quartet improvised melodies on saxophone, upright bass, drums and a slightly out-of-tune piano.
Medieval monks illuminated manuscripts with gold leaf, lapis lazuli pigments and elaborate calligraphy.
Farmers' markets overflow with pumpkins, zucchini, heirloom carrots, radishes and freshly cut sunflowers.
Mountaineers climbed the glacier roped together, carrying ice axes, crampons, oxygen and emergency blankets.
The submarine descended toward hydrothermal vents where strange tubeworms thrive without any sunlight.
Children built sandcastles decorated with seashells, pebbles and driftwood while seagulls circled overhead.
Photographers prefer overcast weather for portraits because diffuse illumination softens harsh wrinkles.
Electric guitars, synthesizers and drum machines defined the sound of eighties pop and new wave music.
Our neighbors renovated their Victorian house, restoring stained-glass windows and ornate wooden moldings.
Migrating geese fly thousands of kilometers each autumn, navigating by the sun, stars and magnetic fields.
The blacksmith hammered glowing iron on the anvil, quenched it in oil and sharpened the finished sword.
Librarians catalogued rare atlases, herbariums, diaries and correspondence donated by a famous explorer.
Wind turbines, solar panels and hydroelectric dams generate renewable electricity for coastal communities.
"""


def learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE as CLIP learned it: merge the most frequent pair of symbols, words ending in `</w>`."""
    byte_to_symbol = bytes_to_unicode()
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    counts = Counter(
        "".join(byte_to_symbol[byte] for byte in word.encode("utf-8")) for word in pattern.findall(corpus.lower())
    )
    words = [[*word[:-1], word[-1] + "</w>"] for word in counts]
    frequencies = list(counts.values())
    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in itertools.pairwise(symbols):
            pair_counts[pair] += frequencies[index]
            pair_words[pair].add(index)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and pair_counts:
        # Ties go to the lexicographically largest pair, so the vocabulary is deterministic.
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        for index in pair_words.pop(best):
            symbols = words[index]
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] -= frequencies[index]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            merged: list[str] = []
            position = 0
            while position < len(symbols):
                if tuple(symbols[position : position + 2]) == best:
                    merged.append(symbols[position] + symbols[position + 1])
                    position += 2
                else:
                    merged.append(symbols[position])
                    position += 1
            words[index] = merged
            for pair in itertools.pairwise(merged):
                pair_counts[pair] += frequencies[index]
                pair_words[pair].add(index)
    return merges


def write_tokenizer_folder(folder: Path, merges: list[tuple[str, str]]) -> None:
    """`vocab.json` and `merges.txt` laid out as in the `tokenizer/` folder of a Stable Diffusion model."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge) for merge in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: id for id, token in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{first} {second}" for first, second in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def clip_tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tokenizer/` folder with a 2000-merge CLIP vocabulary learned on `CORPUS`."""
    folder = tmp_path_factory.mktemp("sd") / "tokenizer"
    write_tokenizer_folder(folder, learn_merges(CORPUS, num_merges=2000))
    return folder
