"""What long-context prompts are made of, read from local files or shipped here.

RULER hides its needles in three kinds of haystack; ours are built without a download:
``noise`` repeats a few plain sentences, ``prose`` is real text (by default the books of the
embedded corpus, or any local text the user names with ``haystack_path``), ``needle`` is made of
distractor needles by the task itself. The words of needle keys and word lists come from lists
shipped in this module (adjective-noun keys as RULER's), from the prose haystack's vocabulary,
or are made up letter by letter (RULER's coded words).
"""

from __future__ import annotations

import random
import re
import string
from functools import lru_cache
from pathlib import Path

from acadlm_plugins.evaluation.lengths import task_error

NOISE_SENTENCES = (
    "The river keeps its own slow pace. The hills are quiet in the evening. "
    "A lamp is lit in the window. The road goes on and comes back again."
)
_WORD_RE = re.compile(r"\S+")


def _texts_from_file(path: Path, *, task: str) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix != ".jsonl":
        raise task_error(task, "haystack_path", f"{path} is neither .txt nor .jsonl.",
                         "Give a text file, a jsonl file with a `text` field, or a folder of them.")
    from acadlm_plugins.evaluation.local_data import iter_json_objects, text_field

    example = '{"text": "..."}'
    return [text_field(row, path, number, task=task, key="haystack_path")
            for number, row in iter_json_objects(path, task=task, key="haystack_path",
                                                 example=example)]


_WORDS_BY_SOURCE: dict[str, tuple[str, ...]] = {}


def _load_words(source: str, task: str) -> tuple[str, ...]:
    """Words of a haystack source, read once per process (every task of a suite shares them);
    ``task`` only names the task in errors."""
    if source in _WORDS_BY_SOURCE:
        return _WORDS_BY_SOURCE[source]
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) \
        if path.is_dir() else [path]
    words: list[str] = []
    for file in files:
        for text in _texts_from_file(file, task=task):
            words.extend(_WORD_RE.findall(text))
    if len(_WORDS_BY_SOURCE) >= 4:
        _WORDS_BY_SOURCE.pop(next(iter(_WORDS_BY_SOURCE)))
    _WORDS_BY_SOURCE[source] = tuple(words)
    return _WORDS_BY_SOURCE[source]


def default_prose_source() -> Path:
    """The long books of the embedded corpus (Shakespeare, Milton, Botchan and the King James
    Bible, whose verse numbers come with it)."""
    from acadlm_plugins.defaults.paths import require_default_corpus

    return require_default_corpus() / "long" / "books.jsonl"


def _prose_source(haystack_path: str | None, *, task: str) -> Path:
    """The file or folder the prose haystack is read from, checked to exist."""
    if not haystack_path:
        return default_prose_source()
    source = Path(haystack_path).expanduser()
    if not source.exists():
        raise task_error(task, "haystack_path", f"{source} does not exist.",
                         "Give a local .txt/.jsonl file or folder, or leave it unset for the "
                         "embedded corpus.")
    return source


def prose_words(haystack_path: str | None, *, task: str, min_words: int) -> tuple[str, ...]:
    """Words of the prose haystack, whitespace-normalized, at least ``min_words`` of them."""
    source = _prose_source(haystack_path, task=task)
    words = _load_words(str(source.resolve()), task)
    if not words:
        raise task_error(task, "haystack_path", f"{source} holds no text.", "Give a file with text.")
    if len(words) < min_words:
        repeats = -(-min_words // len(words))
        words = words * repeats
    return words


def noise_words(min_words: int) -> tuple[str, ...]:
    """The ``noise`` haystack: the same few sentences repeated."""
    unit = NOISE_SENTENCES.split()
    return tuple(unit * (-(-min_words // len(unit))))


# --- Words for keys and word lists ---------------------------------------------------------------
#
# RULER takes its needle keys and its common-words lists from the `wonderwords` package
# (adjective-noun pairs such as "wise-falcon"). We ship our own lists instead, so the keys are
# the same for every model, haystack and machine and nothing has to be installed: everyday
# English words of 4-12 lowercase letters, none of them inside the test models' stock answer
# ("I do not know."), none in both lists.

_ADJECTIVE_TEXT = """
    absent absurd active actual agile agreeable alert alive amber ample amused ancient angry
    anxious arctic ashamed ashen awake balmy bare bashful basic bitter blank bleak blind
    blissful blond blue blunt bold bony bored bouncy brave breezy brief bright brisk broad
    broken bronze brown bubbly bumpy burly busy calm candid careful casual cheap cheerful chief
    chilly chubby civil classic clean clear clever close cloudy clumsy coarse coastal cold comic
    common cool cosmic costly cozy crafty crimson crisp crooked cruel cuddly curious curly
    curved daily dainty damp dapper dark dear decent deep dense dizzy double dreamy drowsy dull
    dusty eager early earnest eastern easy elastic elegant emerald empty endless equal exact
    faint fair false famous fancy fast fearless feeble festive fickle fierce final fine firm
    flat flimsy floral fluffy fond foolish formal fragile fragrant frail frank free fresh
    friendly frosty frozen full funny fuzzy gaudy gentle giant giddy glad gleaming gloomy glossy
    glowing golden good graceful gracious grand grassy grateful greasy great green grey grim
    gritty grumpy hairy handy happy hardy harsh hasty hearty heavy hefty hidden high hilly
    hoarse hollow honest hopeful huge humble humid hungry husky idle inner ivory jagged jaunty
    jolly jovial joyful juicy keen kind knotty lanky large late lavish lazy leafy lean level
    light likely limber limp little lively local lofty lone long loose loud lovely loving loyal
    lucky lumpy lunar magnetic major marine measly meek mellow merry metal mighty mild minor
    misty modern modest moist moral mossy muddy narrow native neat nervous nimble noble noisy
    normal northern nutty olive orange outer oval pale patient peaceful peppery perky petite
    plain playful pleasant plucky plump polar polite poor popular portly precious pretty prickly
    prompt proud puffy pure purple quaint quick quiet quirky radiant ragged rainy rapid rare
    ready real regal rich rigid ripe robust rocky rosy rough round rowdy royal rugged rural
    rustic rusty sacred salty sandy savory scaly scarlet scrawny secret serene shabby shaggy
    shallow sharp shiny short shrill silent silky silly silver simple skinny sleek sleepy
    slender slick slim slimy sloppy slow small smart smoky smooth snappy sneaky snowy soft soggy
    solar solid somber sour southern spare sparkling sparse speedy spicy spiky splendid spotted
    squeaky stale starry steady steamy steep sticky stiff still stocky stony stormy strange
    strict strong stubborn stuffy sturdy subtle sudden sugary sulky sunny super swampy sweet
    swift tall tame tangy tart tawny tender tepid thick thin thorny thrifty tidy timid tiny
    tipsy tired toasty tough towering tranquil tricky trim tropical true tubby twin twisted
    unruly upbeat upper urban usual vacant vague valid vast vibrant violet visible vivid warm
    wary wavy waxy weak wealthy weary weepy western whole wicked wide wild windy wiry wise witty
    wobbly wooden woolly worthy wrinkled yellow young zealous zesty
"""
_NOUN_TEXT = """
    acorn actor airport album almond anchor angle animal ankle antelope apple apricot apron arch
    archer arrow artist attic autumn avenue badge badger bagel baker balcony ballad ballet
    balloon bamboo banana banjo banner barley barn barrel basin basket beach beacon bead beard
    beaver bell bench berry bicycle bison blanket blender blossom board boat bobcat bonfire
    bonnet bottle boulder bouquet bowl bracelet bramble branch bread breeze brick bridge brook
    broom bubble bucket buckle buffalo bugle bunker burrow butter button cabbage cabin cable
    cactus camel camera canal canary candle canoe canvas canyon captain cargo carpet carrot
    carton cashew castle cathedral cavern cedar cellar cello chair chalk channel chapel chariot
    cheese cheetah cherry chestnut chimney chisel cider cinnamon circus citadel clarinet cliff
    clock cloud clover coast cobbler cobra cocoa coconut coffee collar comet compass condor
    cookie copper coral cork corn cottage cotton county cousin coyote cradle cranberry crane
    crate crater crayon creek cricket crow crown crystal cucumber cupboard cupcake curtain
    cushion dagger dairy daisy dancer dandelion delta denim desert diamond dinner doctor dolphin
    dome donkey door dove dragon drawer dream drum dune dungeon eagle easel elbow ember emperor
    engine envelope falafel falcon farmer feather fence fern ferry fiddle field fiesta figure
    finch flag flame flannel flask fleece flute forest forge fork fortress fossil fountain
    freckle frog galaxy gallery garden garlic garnet gate gazelle gecko geyser ginger giraffe
    glacier glove gnome goat goblet gondola goose gorilla granite grape gravel griffin grove
    guitar gull hammer hammock hamster harbor harp hatchet hawk haystack hazel hedgehog helmet
    heron hickory hill hippo honey horizon hornet horse hyena iceberg igloo inkwell island
    jacket jaguar jasmine jelly jewel jigsaw journal juniper kayak kettle kiosk kitten kiwi
    knapsack koala lacquer ladder ladle lagoon lake lamp lantern lark lasso lattice lava lemon
    lemonade leopard lettuce lighthouse lily limestone linen lion lizard llama lobster locket
    lodge loom lotus lynx macaw mackerel magnet mallet mammoth manatee mandolin mango mantle
    maple marble market marmot marsh meadow melon meteor mirror mitten mole monkey monsoon moon
    moose mortar mosaic mosquito moth mountain muffin mule museum muslin mustard napkin nectar
    needle nest novel nutmeg oasis oatmeal obelisk oboe ocean octopus onion orbit orchard orchid
    ostrich otter oven oyster paddle pagoda palace pancake panda panther papaya paper parade
    parrot parsley pasta pastry pavilion peach peacock peanut pearl pebble pecan pelican pencil
    pendant penguin pepper peppermint piano pickle pier pigeon pillow pilot pine pinecone
    pistachio planet plaza plum plume poet pond pony poppy porcupine porridge possum potato
    pottery prairie pretzel prism pudding puddle puffin pumpkin puppet python quarry quartz
    quill quiver rabbit raccoon radish raft raisin rapids rattle raven reef reindeer relic
    rhubarb ribbon riddle ridge river robin rocket rooster rudder saddle saffron sailor salmon
    sapphire sardine satchel sausage scarf school scooter scroll seahorse sequin shark shell
    sheriff shield ship shovel shrimp sketch skunk skyline slate sled sleigh slipper sloth
    smoothie snail snorkel sonnet sparrow spatula spider spinach sponge spoon spruce squirrel
    stable stadium stallion starfish statue steeple stone stork storm strawberry stream street
    sundial sunset swan sweater syrup table tablet tambourine tangerine tapestry tavern teapot
    temple tent termite theater thimble thistle thunder tiara tiger toad toast toffee tomato
    torch tornado toucan tower tractor trail train trellis trombone trumpet tugboat tulip tunnel
    turnip turtle tuxedo umbrella unicorn valley vanilla vase velvet village vineyard violin
    volcano vulture waffle wagon walnut walrus wand wasp weasel whale wheat wheel whistle wigwam
    willow windmill window wizard wolf wombat woodpecker yacht yogurt zebra zeppelin
"""
ADJECTIVES: tuple[str, ...] = tuple(_ADJECTIVE_TEXT.split())
NOUNS: tuple[str, ...] = tuple(_NOUN_TEXT.split())
#: Single words for word lists: RULER's first choice (its wonderwords nouns, adjectives, verbs).
PLAIN_WORDS: tuple[str, ...] = tuple(sorted(ADJECTIVES + NOUNS))
#: How many distinct adjective-noun keys exist (about 256,000).
COMPOUND_SPACE = len(ADJECTIVES) * len(NOUNS)


def compound_words(rng: random.Random, count: int, *, task: str) -> list[str]:
    """``count`` distinct adjective-noun words ("wise-falcon"), as RULER's needle keys are.

    Drawn without replacement from the index space of all pairs, so the cost is linear in
    ``count`` whatever the share of the space it takes: no rejection loop that could run for
    ever once the keys run short. 256,000 pairs cover a haystack of needles of about four
    million tokens; beyond it the error says so.
    """
    if count > COMPOUND_SPACE:
        raise task_error(task, "max_seq_lengths", f"{count} distinct keys are needed but only "
                         f"{COMPOUND_SPACE} adjective-noun pairs exist.", "Use a shorter length.")
    width = len(NOUNS)
    return [f"{ADJECTIVES[index // width]}-{NOUNS[index % width]}"
            for index in rng.sample(range(COMPOUND_SPACE), count)]


def coded_words(rng: random.Random, count: int, letters: int = 6) -> list[str]:
    """``count`` distinct made-up words of ``letters`` random lowercase letters, RULER's
    "coded words" of frequent-words extraction (26**6, about 300 million, exist)."""
    found: dict[str, None] = {}
    while len(found) < count:
        found.setdefault("".join(rng.choices(string.ascii_lowercase, k=letters)), None)
    return list(found)


def prose_vocabulary(haystack_path: str | None, *, task: str) -> tuple[str, ...]:
    """The distinct lowercase words (4-12 letters) of the prose haystack, in order of first
    appearance: the larger word list that word-list tasks fall back on, as RULER falls back on
    a dictionary when its own list is too short."""
    prose_words(haystack_path, task=task, min_words=1)  # reports a missing or empty source
    return _vocabulary_of(str(_prose_source(haystack_path, task=task).resolve()), task)


_PLAIN_WORD_RE = re.compile(r"[a-z]{4,12}")


@lru_cache(maxsize=4)
def _vocabulary_of(source: str, task: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for word in _load_words(source, task):
        cleaned = word.strip(string.punctuation).lower()
        if _PLAIN_WORD_RE.fullmatch(cleaned):
            seen.setdefault(cleaned, None)
    return tuple(seen)
