"""The embedded corpus: synthetic voice-search queries spoken by espeak-ng (and flite).

``synthesize_corpus(out_dir)`` writes::

    out_dir/{train,test,dev}.jsonl              manifests, audio paths relative to out_dir
    out_dir/audio/{train,test,dev}/NNNNNN.wav   16 kHz mono 16-bit PCM
    out_dir/corpus.json                         config + stats; marks the corpus complete

Sentences come from a template grammar of voice-search queries ("weather in boston
tomorrow", "set a timer for twenty five minutes"), numbers spelled out, a vocabulary of a
few hundred words so that a tiny CPU model can learn it. Train, test and dev sentences are
disjoint, and every test and dev word occurs in the training transcripts (they measure
recognition of new word sequences, not of words never heard). The dev split is for
choosing recipes (learning rates, schedules, distillation); the test split reports.

Each utterance gets a random voice (espeak-ng English accents x variants, plus flite voices
when ``flite`` is on PATH), speaking rate and pitch, then augmentation: speed perturbation,
silence padding, optional reverb, additive noise (white, pink or babble) at a random SNR,
random gain. All randomness for utterance ``i`` of a split derives from
``(seed, split, i)``, and espeak-ng's hidden state is reset every ``BLOCK_SIZE``
utterances (each block is spoken by a fresh process), so the corpus is byte-identical for
a seed whatever the number of worker processes.

espeak-ng is GPL: this module loads it (through the ``espeakng-loader`` wheel, the
``synth`` extra) lazily, inside the functions that speak, and nothing on the core import
path imports this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import fcntl
import functools
import importlib.util
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.signal
import soxr

from usmqs.data.audio import SAMPLE_RATE, load_audio, write_audio
from usmqs.data.manifest import write_manifest
from usmqs.data.text import normalize_text

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_NUM_DEV",
    "DEFAULT_NUM_TEST",
    "DEFAULT_NUM_TRAIN",
    "ESPEAK_LANGUAGES",
    "ESPEAK_VARIANTS",
    "FLITE_SHARE",
    "MAX_TRAIN_COPIES",
    "MAX_WORDS",
    "SYNTH_VERSION",
    "Augmentation",
    "Engine",
    "NoiseKind",
    "Voice",
    "VoiceSettings",
    "apply_augmentation",
    "available_flite_voices",
    "draw_augmentation",
    "draw_voice",
    "generate_sentences",
    "number_to_words",
    "parse_flite_voices",
    "random_sentence",
    "synthesize_corpus",
    "voice_pool",
]

log = logging.getLogger(__name__)

# The default size takes ~26 s on the 2-core dev machine with 2 workers (~4.6 ms of CPU
# per utterance, half of it espeak-ng). 8000 training utterances, not fewer: the tiny
# model memorised 3000 (train WER 6 %, test 28 %) instead of learning to spell.
# The default test split holds ~2400 words (one word error = 0.04 % WER).
DEFAULT_NUM_TRAIN = 8000
DEFAULT_NUM_TEST = 400
DEFAULT_NUM_DEV = 400
SPLITS = ("train", "test", "dev")  # drawn in this order: each split depends on the earlier
# Bump when the grammar, voices or augmentation change: a cached corpus with another
# version is regenerated.
SYNTH_VERSION = 1
MAX_TRAIN_COPIES = 2
MAX_WORDS = 8  # keeps utterances within ~1-4 s at the speaking rates drawn below

# ---------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """Spells a cardinal 0 <= n < 1,000,000 the way people say it: 125 -> "one hundred
    twenty five" (American style, no "and")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words supports 0 <= n < 1e6, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    rest = n % 1000
    return number_to_words(n // 1000) + " thousand" + (
        "" if rest == 0 else " " + number_to_words(rest)
    )


def _numbers(lo: int, hi: int) -> tuple[str, ...]:
    return tuple(number_to_words(n) for n in range(lo, hi + 1))


# Slot -> alternatives; an alternative may itself contain {slots}. Alternatives of a slot
# are equally likely. Kept to a few hundred distinct words (see test_synth).
_SLOTS: dict[str, tuple[str, ...]] = {
    "city": (
        "boston", "chicago", "seattle", "denver", "austin", "dallas", "houston", "phoenix",
        "atlanta", "miami", "orlando", "portland", "detroit", "nashville", "london",
        "paris", "berlin", "madrid", "rome", "tokyo", "sydney", "toronto", "dublin",
        "cairo", "vienna", "prague", "lisbon", "oslo", "new york", "los angeles",
        "san francisco", "san diego", "las vegas", "hong kong", "mexico city",
    ),
    "day": (
        "today", "tomorrow", "tonight", "this weekend", "next week", "this morning",
        "this afternoon", "this evening", "on {weekday}", "on {weekday} morning",
    ),
    "past_day": ("yesterday", "last night", "today", "last week", "on {weekday}"),
    "weekday": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "contact": (
        "mom", "dad", "grandma", "grandpa", "my sister", "my brother", "my wife",
        "my husband", "john", "sarah", "michael", "emily", "david", "jessica", "james",
        "olivia", "robert", "sophia", "daniel", "emma", "kevin", "laura", "peter", "anna",
        "steve", "rachel", "lucy", "maria", "the office", "the dentist", "doctor smith",
        "aunt mary", "uncle joe",
    ),
    "genre": (
        "jazz", "rock", "pop", "classical", "blues", "country", "reggae", "hip hop",
        "folk", "metal", "soul", "funk", "disco", "techno",
    ),
    "artist": (
        "miles davis", "john coltrane", "the beatles", "elvis presley", "taylor swift",
        "bob marley", "johnny cash", "frank sinatra", "ella fitzgerald", "louis armstrong",
        "david bowie", "queen", "prince", "madonna", "adele", "nina simone",
        "billie holiday", "aretha franklin", "stevie wonder", "michael jackson",
        "the rolling stones", "pink floyd", "bach", "mozart", "beethoven", "chopin",
    ),
    "music_thing": (
        "something", "songs", "the latest album", "the greatest hits", "love songs",
        "something relaxing", "the new single",
    ),
    "minutes": _numbers(1, 59),
    "duration_unit": ("minutes", "seconds", "hours"),
    "hour": _numbers(1, 12),
    "clock": ("{hour} o'clock", "{hour} thirty", "{hour} fifteen", "{hour} forty five",
              "{hour} oh five", "{hour} twenty"),
    "part_of_day": ("in the morning", "in the evening", "at night", "in the afternoon"),
    "place": (
        "the nearest gas station", "the closest coffee shop", "the airport",
        "the train station", "the hospital", "the library", "the museum", "the park",
        "the beach", "the mall", "the nearest pharmacy", "a grocery store",
        "the post office", "work", "home", "the gym", "the stadium", "the zoo",
        "a pizza place", "a chinese restaurant", "an italian restaurant",
        "a mexican restaurant", "the bank", "the hotel", "the nearest parking lot",
        "{city}", "downtown {city}",
    ),
    "poi": (
        "gas stations", "coffee shops", "restaurants", "pharmacies", "hotels", "parks",
        "bakeries", "bookstores", "hospitals", "museums", "grocery stores",
    ),
    "room": (
        "kitchen", "bedroom", "living room", "bathroom", "garage", "office", "hallway",
        "basement", "dining room",
    ),
    "device": (
        "fan", "heater", "air conditioner", "television", "radio", "oven",
        "coffee maker", "dishwasher", "washing machine", "lamp", "flashlight",
    ),
    "temperature": _numbers(60, 80),
    "task": (
        "buy milk", "call the bank", "pay the rent", "water the plants",
        "take out the trash", "walk the dog", "feed the cat", "pick up the kids",
        "book a flight", "send the report", "clean the kitchen", "wash the car",
        "renew my passport", "buy a birthday present", "go to the gym", "call {contact}",
        "check the mail", "buy bread and eggs",
    ),
    "language": (
        "spanish", "french", "german", "italian", "japanese", "chinese", "russian",
        "portuguese", "arabic", "hindi", "korean", "dutch", "greek", "swedish",
    ),
    "phrase": (
        "hello", "thank you", "goodbye", "good morning", "good night", "please", "water",
        "friend", "how are you", "where is the station", "i love you", "excuse me",
    ),
    "amount": _numbers(1, 20) + ("thirty", "fifty", "one hundred", "two hundred",
                                 "five hundred", "one thousand"),
    "unit": (
        "miles", "kilometers", "pounds", "kilograms", "inches", "centimeters", "feet",
        "meters", "ounces", "grams", "cups", "liters", "gallons", "dollars", "euros",
    ),
    "small": _numbers(1, 99),
    "operator": ("plus", "minus", "times", "divided by"),
    "team": (
        "lakers", "celtics", "yankees", "red sox", "patriots", "giants", "bulls",
        "warriors", "cowboys", "packers", "knicks", "dodgers", "cubs", "bears", "eagles",
        "jets", "rangers", "seahawks",
    ),
    "company": (
        "apple", "google", "amazon", "microsoft", "tesla", "netflix", "nvidia", "intel",
        "boeing", "disney", "nike", "ford",
    ),
    "topic": (
        "science", "sports", "politics", "technology", "business", "health", "movies",
        "space", "music", "the economy", "the election", "football", "basketball",
        "baseball", "soccer", "tennis", "golf",
    ),
    "food": (
        "pancakes", "lasagna", "banana bread", "chicken soup", "guacamole",
        "chocolate chip cookies", "fried rice", "apple pie", "pizza", "french toast",
        "mashed potatoes", "an omelette", "curry", "hummus", "tacos", "chili",
        "caesar salad", "lemonade",
    ),
    "app": (
        "maps", "the camera", "my calendar", "settings", "photos", "youtube", "spotify",
        "my email", "the calculator", "the weather app", "my messages", "the clock",
    ),
    "message": (
        "i'm running late", "i'll be there soon", "see you tonight", "call me back",
        "happy birthday", "on my way", "thank you", "i'm at home", "where are you",
        "dinner is ready",
    ),
    "landmark": (
        "the eiffel tower", "mount everest", "the empire state building",
        "the statue of liberty", "the golden gate bridge", "big ben",
        "the great wall of china", "the space needle",
    ),
    "animal": ("a dog", "a cat", "an elephant", "a horse", "a lion", "a cow", "a whale"),
}

# (weight, template). Weights roughly follow what a voice assistant hears most.
_TEMPLATES: tuple[tuple[float, str], ...] = (
    (3, "weather in {city} {day}"),
    (2, "what's the weather {day}"),
    (2, "what's the weather like in {city}"),
    (2, "will it rain {day}"),
    (2, "will it rain in {city} {day}"),
    (1, "is it going to snow {day}"),
    (1, "how hot is it in {city}"),
    (3, "call {contact}"),
    (1, "call {contact} on speaker"),
    (2, "text {contact} {message}"),
    (1, "send a message to {contact}"),
    (2, "play {genre}"),
    (2, "play some {genre} music"),
    (3, "play {music_thing} by {artist}"),
    (2, "play {artist}"),
    (1, "shuffle my {genre} playlist"),
    (1, "turn the volume up"),
    (1, "turn the volume down"),
    (1, "skip this song"),
    (1, "who sings this song"),
    (3, "set a timer for {minutes} {duration_unit}"),
    (2, "set an alarm for {clock}"),
    (2, "wake me up at {clock} {part_of_day}"),
    (1, "cancel my {clock} alarm"),
    (3, "navigate to {place}"),
    (2, "directions to {place}"),
    (2, "how far is {place}"),
    (1, "how long to get to {place}"),
    (2, "find {poi} near me"),
    (1, "show me {poi} in {city}"),
    (2, "turn on the {room} lights"),
    (2, "turn off the {room} lights"),
    (2, "turn on the {device}"),
    (2, "turn off the {device}"),
    (2, "set the thermostat to {temperature} degrees"),
    (1, "dim the lights in the {room}"),
    (3, "remind me to {task} {day}"),
    (1, "remind me to {task} at {clock}"),
    (1, "add {food} to my shopping list"),
    (2, "what's on my calendar {day}"),
    (1, "schedule a meeting with {contact} {day}"),
    (2, "how do you say {phrase} in {language}"),
    (1, "translate {phrase} to {language}"),
    (2, "convert {amount} {unit} to {unit}"),
    (1, "how many {unit} in {amount} {unit}"),
    (2, "what is {small} {operator} {small}"),
    (1, "what is the square root of {small}"),
    (2, "did the {team} win {past_day}"),
    (1, "when do the {team} play next"),
    (1, "what's the score of the {team} game"),
    (2, "what is the stock price of {company}"),
    (1, "how is {company} stock doing"),
    (2, "show me the latest news about {topic}"),
    (1, "read me the news"),
    (2, "how do i make {food}"),
    (1, "find a recipe for {food}"),
    (2, "open {app}"),
    (1, "how tall is {landmark}"),
    (1, "how old is {landmark}"),
    (1, "what time is it in {city}"),
    (1, "what sound does {animal} make"),
    (1, "tell me a joke"),
    (1, "what time is it"),
)

_SLOT_RE = re.compile(r"\{(\w+)\}")
_TEMPLATE_P = np.array([w for w, _ in _TEMPLATES]) / sum(w for w, _ in _TEMPLATES)


def _expand(pattern: str, rng: np.random.Generator) -> str:
    def fill(match: re.Match) -> str:
        options = _SLOTS[match.group(1)]
        return _expand(options[rng.integers(len(options))], rng)

    return _SLOT_RE.sub(fill, pattern)


def random_sentence(rng: np.random.Generator) -> str:
    """One normalized query from the grammar, at most ``MAX_WORDS`` words."""
    while True:
        template = _TEMPLATES[rng.choice(len(_TEMPLATES), p=_TEMPLATE_P)][1]
        sentence = normalize_text(_expand(template, rng))
        if len(sentence.split()) <= MAX_WORDS:
            return sentence


def _held_out(
    rng: np.random.Generator, num: int, name: str, exclude: set[str], vocab: set[str]
) -> list[str]:
    """``num`` distinct sentences not in ``exclude`` and within ``vocab`` (redrawn until so)."""
    out: list[str] = []
    seen = set(exclude)
    max_draws = 1000 + 200 * num
    for _ in range(max_draws):
        if len(out) == num:
            break
        s = random_sentence(rng)
        if s in seen or not vocab.issuperset(s.split()):
            continue
        out.append(s)
        seen.add(s)
    if len(out) < num:
        raise ValueError(
            f"found only {len(out)} of {num} {name} sentences disjoint from the other splits "
            f"and within the training vocabulary after {max_draws} draws; use more training "
            f"sentences or fewer {name} ones (num_{name})"
        )
    return out


def generate_sentences(
    num_train: int, num_test: int, seed: int = 0, num_dev: int = 0
) -> tuple[list[str], list[str], list[str]]:
    """Draws the train, test and dev transcripts (normalized text; no audio).

    A train sentence occurs at most ``MAX_TRAIN_COPIES`` times (a frequent query spoken
    by several voices). Test sentences are distinct, never occur in train, and use only
    words that occur in train; dev sentences likewise, and never occur in test: drawn
    sentences violating a rule are rejected and redrawn. Each split has its own random
    stream, so adding a dev split leaves train and test unchanged.

    Raises:
      ValueError: fewer than ``num_test`` (``num_dev``) acceptable sentences in a bounded
        number of draws (only with a tiny ``num_train``).
    """
    train_rng = np.random.default_rng([seed, 0x5E7, 0])
    train: list[str] = []
    copies: Counter[str] = Counter()
    while len(train) < num_train:
        s = random_sentence(train_rng)
        # A capped number of copies: short fixed queries ("tell me a joke") would
        # otherwise fill a tenth of the corpus with the same few sentences.
        if copies[s] < MAX_TRAIN_COPIES:
            copies[s] += 1
            train.append(s)
    vocab = {w for s in train for w in s.split()}
    test = _held_out(np.random.default_rng([seed, 0x5E7, 1]), num_test, "test", set(train), vocab)
    dev = _held_out(
        np.random.default_rng([seed, 0x5E7, 2]), num_dev, "dev", set(train) | set(test), vocab
    )
    return train, test, dev


# ---------------------------------------------------------------------------------------
# Voices
# ---------------------------------------------------------------------------------------

ESPEAK_LANGUAGES = (
    "en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc",
    "en-gb-x-gbclan", "en-gb-x-gbcwmd",
)  # fmt: skip
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
FLITE_SHARE = 0.25  # fraction of utterances given to flite voices when flite is present
# Limited-domain flite voices (they only say the time) are useless for open text.
_FLITE_EXCLUDED = frozenset({"awb_time"})


class Engine(enum.StrEnum):
    ESPEAK = "espeak"
    FLITE = "flite"


@dataclass(frozen=True)
class Voice:
    """A synthesizer voice: ``name`` is an espeak voice spec (``"en-gb-x-rp+f2"``) or a
    flite ``-voice`` argument (``"slt"``)."""

    engine: Engine
    name: str


@dataclass(frozen=True)
class VoiceSettings:
    """A voice plus the prosody drawn for one utterance.

    Attributes:
      rate: speaking rate in words per minute (espeak's default is 175).
      pitch: base pitch 0-100 (espeak scale, default 50); flite keeps its own.
      pitch_range: intonation range 0-100 (espeak scale); flite keeps its own.
    """

    voice: Voice
    rate: int
    pitch: int
    pitch_range: int


def parse_flite_voices(listing: str) -> list[str]:
    """Voice names from ``flite -lv`` output (``"Voices available: kal awb_time slt"``),
    minus limited-domain voices."""
    _, _, names = listing.partition(":")
    return [v for v in names.split() if v not in _FLITE_EXCLUDED]


def available_flite_voices(flite: str | None = None) -> list[str]:
    """Voices of the ``flite`` binary (default: the one on PATH); ``[]`` without one."""
    flite = flite or shutil.which("flite")
    if flite is None:
        return []
    try:
        listing = subprocess.run(
            [flite, "-lv"], capture_output=True, text=True, timeout=30
        ).stdout  # not checked: what matters is the listing
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("flite at %s unusable (%s); espeak voices only", flite, e)
        return []
    return parse_flite_voices(listing)


def voice_pool(flite_voices: Sequence[str] = ()) -> tuple[Voice, ...]:
    """Every espeak accent x variant, then the given flite voices."""
    espeak = tuple(
        Voice(Engine.ESPEAK, lang + (f"+{var}" if var else ""))
        for lang in ESPEAK_LANGUAGES
        for var in ESPEAK_VARIANTS
    )
    return espeak + tuple(Voice(Engine.FLITE, v) for v in flite_voices)


def draw_voice(rng: np.random.Generator, pool: Sequence[Voice]) -> VoiceSettings:
    """Draws a voice and prosody. Flite voices, when the pool has any, get
    ``FLITE_SHARE`` of the utterances whatever their number (there are far fewer of
    them than espeak voices); within an engine voices are equally likely."""
    espeak = [v for v in pool if v.engine is Engine.ESPEAK]
    flite = [v for v in pool if v.engine is Engine.FLITE]
    use_flite = bool(flite) and (not espeak or rng.random() < FLITE_SHARE)
    group = flite if use_flite else espeak
    voice = group[rng.integers(len(group))]
    return VoiceSettings(
        voice=voice,
        rate=int(rng.integers(140, 221)),
        pitch=int(rng.integers(25, 76)),
        pitch_range=int(rng.integers(30, 81)),
    )


# espeak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit()
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 3, 4
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _Espeak:
    """The process's espeak-ng instance (its state is global: one per process, not
    thread-safe, hence worker processes)."""

    def __init__(self):
        try:
            import espeakng_loader  # GPL; loaded only here, on demand
        except ImportError as e:
            raise ImportError(
                "the synthetic corpus needs espeak-ng: pip install 'usmqs[synth]'"
            ) from e
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(),
            _ESPEAK_INITIALIZE_DONT_EXIT,
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # referenced: C keeps a pointer
        lib.espeak_SetSynthCallback(self._callback)
        # espeak draws noise for breathy/klatt voices from its own PRNG and libc rand();
        # both are reseeded per utterance so output does not depend on what the process
        # spoke before.
        self._set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_rand_seed is not None:
            self._set_rand_seed.argtypes = [ctypes.c_long]
        self._srand = ctypes.CDLL(None).srand
        self._srand.argtypes = [ctypes.c_uint]

    def _collect(self, wav, num_samples, events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def speak(self, text: str, settings: VoiceSettings, seed: int) -> np.ndarray:
        """Returns float32 [N] at ``self.sample_rate`` (22050 Hz)."""
        lib = self._lib
        if lib.espeak_SetVoiceByName(settings.voice.name.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {settings.voice.name!r}")
        lib.espeak_SetParameter(_ESPEAK_RATE, settings.rate, 0)
        lib.espeak_SetParameter(_ESPEAK_PITCH, settings.pitch, 0)
        lib.espeak_SetParameter(_ESPEAK_RANGE, settings.pitch_range, 0)
        if self._set_rand_seed is not None:
            self._set_rand_seed(seed)
        self._srand(seed)
        self._chunks = []
        data = text.encode("utf-8")
        err = lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _ESPEAK_CHARS_UTF8, None, None)
        if err != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng failed ({err}) on {text!r} with {settings}")
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


@functools.cache
def _espeak() -> _Espeak:
    return _Espeak()


def _flite_speak(flite: str, text: str, settings: VoiceSettings) -> tuple[np.ndarray, int]:
    """Runs the flite binary; returns (float32 [N], sample rate)."""
    # flite has no words-per-minute control; duration_stretch scales segment durations.
    stretch = 175.0 / settings.rate
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "out.wav")
        cmd = [flite, "-voice", settings.voice.name, "--setf", f"duration_stretch={stretch:.3f}",
               "-t", text, "-o", wav]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return load_audio(wav, target_sr=SAMPLE_RATE), SAMPLE_RATE


# ---------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------


class NoiseKind(enum.StrEnum):
    NONE = "none"
    WHITE = "white"
    PINK = "pink"
    BABBLE = "babble"  # 3-6 other synthetic talkers, mixed


@dataclass(frozen=True)
class Augmentation:
    """What is done to one clean utterance (all drawn by :func:`draw_augmentation`).

    Attributes:
      speed: speed perturbation factor (>1 faster and higher; Kaldi-style resampling).
      lead_s, trail_s: silence added before/after the speech, seconds.
      reverb_rt60_s: reverberation time of the synthetic room, seconds; None = dry.
      reverb_wet: level of the reverberant tail relative to the direct sound.
      noise: noise type.
      snr_db: speech-to-noise power ratio in dB (ignored when noise is NONE).
      peak_db: final peak level in dBFS (< 0: the output never clips).
    """

    speed: float
    lead_s: float
    trail_s: float
    reverb_rt60_s: float | None
    reverb_wet: float
    noise: NoiseKind
    snr_db: float
    peak_db: float


def draw_augmentation(rng: np.random.Generator) -> Augmentation:
    """Draws an augmentation: speed 0.9-1.1; reverb with probability 0.3 (RT60 0.15-0.6 s);
    noise with probability 0.8 (white/pink/babble) at SNR 10-30 dB (babble 15-30 dB: it
    is speech-like and would otherwise teach the model to transcribe the background);
    peak level -20 to -1 dBFS."""
    speed = float(rng.uniform(0.9, 1.1))
    lead_s, trail_s = (float(x) for x in rng.uniform(0.05, 0.3, size=2))
    reverb = rng.random() < 0.3
    rt60 = float(rng.uniform(0.15, 0.6))
    wet = float(rng.uniform(0.2, 0.6))
    noisy = rng.random() < 0.8
    kind = (NoiseKind.WHITE, NoiseKind.PINK, NoiseKind.BABBLE)[rng.integers(3)]
    snr = float(rng.uniform(15.0 if kind is NoiseKind.BABBLE else 10.0, 30.0))
    peak_db = float(rng.uniform(-20.0, -1.0))
    return Augmentation(
        speed=speed,
        lead_s=lead_s,
        trail_s=trail_s,
        reverb_rt60_s=rt60 if reverb else None,
        reverb_wet=wet,
        noise=kind if noisy else NoiseKind.NONE,
        snr_db=snr,
        peak_db=peak_db,
    )


def _pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    # 1/f power spectrum: shape white noise by 1/sqrt(f) in the frequency domain.
    # The FFT runs at a fast (5-smooth) length: utterance lengths often have large prime
    # factors, which make a plain FFT tens of times slower.
    m = scipy.fft.next_fast_len(n, real=True)
    spectrum = scipy.fft.rfft(rng.standard_normal(m))
    f = np.arange(spectrum.shape[0], dtype=np.float64)
    f[0] = 1.0
    return scipy.fft.irfft(spectrum / np.sqrt(f), m)[:n]


def _room_impulse_response(rt60_s: float, wet: float, rng: np.random.Generator) -> np.ndarray:
    # Direct path + exponentially decaying noise tail: amplitude falls 60 dB in rt60_s.
    n = max(2, int(rt60_s * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60_s)
    tail[0] = 0.0
    tail *= wet / np.sqrt(np.sum(tail**2))
    tail[0] = 1.0
    return tail


def apply_augmentation(
    speech: np.ndarray,
    sr: int,
    aug: Augmentation,
    rng: np.random.Generator,
    babble: np.ndarray | None = None,
) -> np.ndarray:
    """Clean speech -> augmented 16 kHz waveform.

    Args:
      speech: float32 [N] at ``sr`` Hz.
      sr: its sample rate.
      aug: what to do.
      rng: draws the noise samples and the impulse response.
      babble: float [M] at 16 kHz, required when ``aug.noise`` is BABBLE (tiled or cut
        to length).

    Returns:
      float32 [T] at 16 kHz, ``T ~= N * 16000 / (sr * speed) + (lead_s + trail_s) * 16000``
      (+ up to 0.1 s of reverb tail), peak exactly ``10 ** (peak_db / 20)`` (< 1).
    """
    # Speed perturbation and the resampling to 16 kHz in one step: reading the samples as
    # if taken at sr * speed shortens them by 1/speed (tempo and pitch both change).
    x = soxr.resample(speech.astype(np.float32), sr * aug.speed, SAMPLE_RATE, quality="HQ")
    x = np.concatenate([
        np.zeros(int(aug.lead_s * SAMPLE_RATE), np.float32), x,
        np.zeros(int(aug.trail_s * SAMPLE_RATE), np.float32),
    ]).astype(np.float64)  # fmt: skip
    if aug.reverb_rt60_s is not None:
        ir = _room_impulse_response(aug.reverb_rt60_s, aug.reverb_wet, rng)
        x = scipy.signal.fftconvolve(x, ir)[: x.shape[0] + SAMPLE_RATE // 10]
    if aug.noise is not NoiseKind.NONE:
        n = x.shape[0]
        if aug.noise is NoiseKind.WHITE:
            noise = rng.standard_normal(n)
        elif aug.noise is NoiseKind.PINK:
            noise = _pink_noise(n, rng)
        else:
            if babble is None or babble.size == 0:
                raise ValueError("babble noise needs the babble waveform")
            noise = np.resize(babble.astype(np.float64), n)
        speech_power = np.mean(x**2)
        noise_power = np.mean(noise**2)
        if noise_power > 0 and speech_power > 0:
            x = x + noise * np.sqrt(speech_power / (noise_power * 10 ** (aug.snr_db / 10)))
    peak = np.max(np.abs(x))
    if peak > 0:
        x *= 10 ** (aug.peak_db / 20) / peak
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Rendering (runs in worker processes)
# ---------------------------------------------------------------------------------------

_SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}
_STREAM_AUDIO = 0xA0D  # keeps utterance streams apart from the sentence streams
# espeak-ng carries hidden synthesis state from one utterance to the next (oscillator
# phase, flutter position, ...; espeak_Terminate + espeak_Initialize do not reset it), so
# the same call gives slightly different samples depending on what the process spoke
# before. Utterances are therefore rendered in fixed blocks, each by a fresh process, in
# a fixed order: the audio depends on (seed, split, index) and the block layout only,
# never on the number of workers or on scheduling. Changing BLOCK_SIZE changes the audio.
BLOCK_SIZE = 100


@dataclass(frozen=True)
class _Job:
    split: str
    index: int
    text: str
    path: str  # absolute output wav


@dataclass(frozen=True)
class _RenderConfig:
    seed: int
    pool: tuple[Voice, ...]
    flite: str | None


def _speak(text: str, settings: VoiceSettings, config: _RenderConfig, seed: int):
    if settings.voice.engine is Engine.FLITE:
        if config.flite is None:
            raise RuntimeError("a flite voice was drawn but no flite binary is configured")
        return _flite_speak(config.flite, text, settings)
    engine = _espeak()
    return engine.speak(text, settings, seed), engine.sample_rate


def _render(job: _Job, config: _RenderConfig) -> int:
    """Speaks, augments and writes one utterance; returns its number of samples."""
    rng = np.random.default_rng([config.seed, _STREAM_AUDIO, _SPLIT_IDS[job.split], job.index])
    espeak_seed = int(rng.integers(2**31))
    settings = draw_voice(rng, config.pool)
    speech, sr = _speak(job.text, settings, config, espeak_seed)
    aug = draw_augmentation(rng)
    babble = None
    if aug.noise is NoiseKind.BABBLE:
        espeak_voices = [v for v in config.pool if v.engine is Engine.ESPEAK] or config.pool
        talkers = []
        for _ in range(int(rng.integers(3, 7))):
            other = draw_voice(rng, espeak_voices)
            wave, other_sr = _speak(random_sentence(rng), other, config, espeak_seed)
            wave = soxr.resample(wave, other_sr, SAMPLE_RATE)
            talkers.append(wave / (np.sqrt(np.mean(wave**2)) + 1e-9))
        length = max(t.shape[0] for t in talkers)
        babble = sum(np.pad(t, (0, length - t.shape[0])) for t in talkers)
    audio = apply_augmentation(speech, sr, aug, rng, babble=babble)
    write_audio(job.path, audio, SAMPLE_RATE)
    return int(audio.shape[0])


_BLOCK_RENDERED = False  # set once this process has rendered a block


def _render_block(task: tuple[list[_Job], _RenderConfig]) -> list[tuple[str, int, int]]:
    """Renders one block in order; returns (split, index, num_samples) per job. Runs in a
    process of its own (see BLOCK_SIZE)."""
    global _BLOCK_RENDERED
    if _BLOCK_RENDERED:
        raise RuntimeError("a block must be rendered by a fresh process (determinism)")
    _BLOCK_RENDERED = True
    jobs, config = task
    return [(job.split, job.index, _render(job, config)) for job in jobs]


# ---------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------


def _corpus_config(sizes: dict[str, int], seed: int, pool: Sequence[Voice]) -> dict:
    return {
        "synth_version": SYNTH_VERSION,
        **{f"num_{split}": sizes[split] for split in SPLITS},
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
        "voices": [f"{v.engine}:{v.name}" for v in pool],
    }


def _reusable_splits(marker: Path, config: dict, manifests: dict[str, Path]) -> tuple[list[str], dict]:
    """The leading splits (in ``SPLITS`` order) an existing corpus already holds as
    ``config`` would make them, and their recorded stats. A split's sentences depend on
    the earlier splits only, so a changed split invalidates it and every later one."""
    try:
        old = json.loads(marker.read_text())
        old_config, old_stats = old["config"], old["stats"]
    except (OSError, ValueError, KeyError, TypeError):
        return [], {}
    shared = [k for k in config if not k.startswith("num_")]
    if any(old_config.get(k) != config[k] for k in shared):
        return [], {}
    kept = []
    for split in SPLITS:
        key = f"num_{split}"
        if old_config.get(key) != config[key] or split not in old_stats or not manifests[split].is_file():
            break
        kept.append(split)
    return kept, {split: old_stats[split] for split in kept}


def synthesize_corpus(
    out_dir: str | os.PathLike,
    *,
    num_train: int | None = DEFAULT_NUM_TRAIN,
    num_test: int | None = DEFAULT_NUM_TEST,
    num_dev: int | None = DEFAULT_NUM_DEV,
    seed: int = 0,
    num_workers: int = 2,
    flite: str | bool = True,
) -> dict[str, Path]:
    """Synthesizes the embedded corpus into ``out_dir`` (cached).

    If ``out_dir/corpus.json`` records the same configuration (sizes, seed, synthesizer
    version, voice pool) and the manifests exist, nothing is redone. Otherwise the splits
    that differ are replaced (``out_dir/audio/<split>``), with every split after them in
    ``SPLITS`` order: a corpus made before the dev split existed keeps its train and test
    audio and gains ``dev``. ``out_dir`` belongs to the synthesizer. Processes asking for
    a corpus in the same ``out_dir`` take turns (a file lock, ``out_dir/.lock``): the
    later one finds it made.

    Args:
      out_dir: output folder (created).
      num_train, num_test, num_dev: utterances per split; 0 or None mean the defaults
        (``DEFAULT_NUM_TRAIN``, ...: configs use 0 for "default"). The default test and
        dev splits hold > 1000 words each, so one word error is < 0.1 % WER.
      seed: everything (sentences, voices, augmentation, noise) derives from it; the same
        seed gives byte-identical manifests and audio, whatever ``num_workers``.
      num_workers: processes speaking in parallel. Each block of ``BLOCK_SIZE``
        utterances is spoken by a fresh process (espeak-ng keeps hidden state between
        utterances); espeak-ng never runs in the calling process.
      flite: ``True`` (default): use ``flite`` from PATH if there is one; ``False``:
        espeak-ng only; a string: the flite binary to use. Flite voices, when used, speak
        ``FLITE_SHARE`` of the utterances.

    Returns:
      ``{"train": out_dir/train.jsonl, "test": out_dir/test.jsonl, "dev": out_dir/dev.jsonl}``.
    """
    defaults = (DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST, DEFAULT_NUM_DEV)
    sizes = {split: n or d for split, n, d in zip(SPLITS, (num_train, num_test, num_dev), defaults)}
    if min(sizes.values()) < 0:
        raise ValueError(f"corpus sizes must be >= 0, got {sizes}")
    if importlib.util.find_spec("espeakng_loader") is None:  # found, not imported
        raise ImportError("the synthetic corpus needs espeak-ng: pip install 'usmqs[synth]'")
    out = Path(out_dir).absolute()
    if flite is True:
        flite = shutil.which("flite")
    flite = flite or None
    pool = voice_pool(available_flite_voices(flite) if flite else ())
    manifests = {split: out / f"{split}.jsonl" for split in SPLITS}
    with _exclusive(out):  # concurrent runs on one machine share the corpus folder
        _make_corpus(out, _corpus_config(sizes, seed, pool), pool, flite, num_workers, manifests)
    return manifests


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Holds ``out/.lock`` (flock): one synthesizer per corpus folder at a time. Another
    process asking for the same corpus waits, then finds it made (or makes what differs)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process synthesizing into %s", out)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make_corpus(out: Path, config: dict, pool, flite, num_workers: int, manifests: dict[str, Path]) -> None:
    """Renders the splits that ``out`` does not already hold as ``config`` makes them."""
    marker = out / "corpus.json"
    seed = config["seed"]
    kept, kept_stats = _reusable_splits(marker, config, manifests)
    if len(kept) == len(SPLITS):
        log.info("synthetic corpus in %s is up to date", out)
        return
    marker.unlink(missing_ok=True)  # the corpus is incomplete until the marker is back

    start = time.perf_counter()
    drawn = generate_sentences(config["num_train"], config["num_test"], seed, config["num_dev"])
    sentences = {split: texts for split, texts in zip(SPLITS, drawn) if split not in kept}
    jobs: dict[str, list[_Job]] = {}
    for split, texts in sentences.items():
        folder = out / "audio" / split
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        jobs[split] = [_Job(split, i, t, str(folder / f"{i:06d}.wav")) for i, t in enumerate(texts)]
    render_config = _RenderConfig(seed=seed, pool=pool, flite=flite)
    blocks = [
        (jobs_of_split[i : i + BLOCK_SIZE], render_config)
        for jobs_of_split in jobs.values()
        for i in range(0, len(jobs_of_split), BLOCK_SIZE)
    ]
    # One fresh process per block (maxtasksperchild=1). forkserver forks them from a
    # clean single-threaded server that has this module preloaded: cheap, and safe when
    # the caller has JAX's threads running (plain fork is not).
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])
    samples: dict[tuple[str, int], int] = {}
    workers = max(1, min(num_workers, len(blocks)))
    with ctx.Pool(workers, maxtasksperchild=1) as p:
        for rendered in p.imap_unordered(_render_block, blocks):
            for split, index, n in rendered:
                samples[split, index] = n

    stats = dict(kept_stats)
    for split, texts in sentences.items():
        rows = [
            {
                "audio_filepath": f"audio/{split}/{i:06d}.wav",
                "text": text,
                "duration": samples[split, i] / SAMPLE_RATE,
            }
            for i, text in enumerate(texts)
        ]
        write_manifest(manifests[split], rows)
        durations = [r["duration"] for r in rows]
        stats[split] = {
            "utterances": len(rows),
            "words": sum(len(t.split()) for t in texts),
            "vocabulary": len({w for t in texts for w in t.split()}),
            "hours": round(sum(durations) / 3600, 4),
            "min_duration_s": round(min(durations), 3) if durations else 0.0,
            "max_duration_s": round(max(durations), 3) if durations else 0.0,
        }
    # Written last and atomically: its presence means the corpus is complete. No timings
    # in it, so that it is as reproducible as the rest.
    tmp = marker.with_name("corpus.json.tmp")
    tmp.write_text(json.dumps({"config": config, "stats": stats}, indent=2) + "\n")
    os.replace(tmp, marker)
    log.info("synthesized %s utterances into %s in %.1f s (kept: %s)",
             {k: len(v) for k, v in sentences.items()}, out, time.perf_counter() - start,
             ", ".join(kept) or "nothing")
