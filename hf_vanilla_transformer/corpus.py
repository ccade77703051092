"""The embedded default corpus: a synthetic language pair generated from a seed (no data files).

Two invented languages, ``xa`` (source) and ``xb`` (target); the translation is a deterministic function of the source
sentence, so a model can in principle reach BLEU 100. Grammar, with ``xa`` on the left and ``xb`` on the right:

- Clause: ``S V O [Adv] [Prep NP]``  ->  ``S [NP-loc Postp] O [Adv] V``: the target is verb-final (SOV), the adverb
  moves before the verb and prepositions become postpositions after a locative noun phrase.
- Noun phrase: ``Det Adj1 Adj2 N [ke VP]``  ->  ``N Adj2 Adj1 [Det] [ke O V]``: adjectives follow the noun in mirror
  order, the definite article becomes a phrase-final particle (the indefinite one disappears), and a subject relative
  clause stays after its noun but is itself verb-final.
- Morphology (regular, stem + suffix): ``xa`` marks plural nouns (``-s``) and verbs for number/tense (``-t`` singular,
  ``-n`` plural, ``-d`` past). ``xb`` nouns AND their adjectives take number + case (``-re`` plural; ``-ma``
  accusative, ``-ti`` locative), and verbs agree with their subject (``-ka`` past, ``-ni`` plural).
- Sentences are one clause or two joined by a conjunction (``and``/``but``/``because``), 3 to 40 words.

Held-out combinations: about 10% of (adjective, noun) pairs and of (verb, object noun) pairs never occur in train;
every validation/test sentence contains one of each in its main clause, so evaluation measures generalisation to
unseen combinations, not recall of seen sentences. Lexemes are drawn uniformly, so each is seen many times in train.
"""

import random
from dataclasses import dataclass

import datasets
import numpy as np

SOURCE_LANG = "xa"
TARGET_LANG = "xb"

_LEXICON_SEED = 1234  # the languages themselves are fixed; `seed` only changes which sentences are drawn
NUM_NOUNS, NUM_VERBS, NUM_ADJECTIVES, NUM_ADVERBS = 500, 250, 250, 40
_HELD_OUT_RATE = 0.1
_MAX_WORDS = 40

# Function words: (xa, xb). The xb article is a phrase-final particle; "" means the word is not expressed.
_DEFINITE, _INDEFINITE = ("ta", "do"), ("nu", "")
_RELATIVE = ("ke", "ke")
_CONJUNCTIONS = (("e", "ya"), ("ma", "ba"), ("po", "kwo"))
_ADPOSITIONS = (("in", "hu"), ("su", "wa"), ("ot", "he"), ("pri", "jo"), ("kon", "xu"), ("sin", "qe"))
_FUNCTION_WORDS = (_DEFINITE, _INDEFINITE, _RELATIVE, *_CONJUNCTIONS, *_ADPOSITIONS)

# Suffixes. Number then case on xb nominals; tense then number on xb verbs.
_XA_PLURAL = "s"
_XA_VERB = {("pres", "sg"): "t", ("pres", "pl"): "n", ("past", "sg"): "d", ("past", "pl"): "d"}  # past: no number
_XB_NUMBER, _XB_CASE = {"sg": "", "pl": "re"}, {"nom": "", "acc": "ma", "loc": "ti"}
_XB_TENSE, _XB_VERB_NUMBER = {"pres": "", "past": "ka"}, {"sg": "", "pl": "ni"}


@dataclass(frozen=True)
class Lexicon:
    """Stems of each word class, index-aligned across the two languages (``nouns[i]`` translates to ``xb_nouns[i]``)."""

    nouns: tuple[str, ...]
    verbs: tuple[str, ...]
    adjectives: tuple[str, ...]
    adverbs: tuple[str, ...]
    xb_nouns: tuple[str, ...]
    xb_verbs: tuple[str, ...]
    xb_adjectives: tuple[str, ...]
    xb_adverbs: tuple[str, ...]
    held_out_adj_noun: np.ndarray  # bool [adjectives, nouns]
    held_out_verb_object: np.ndarray  # bool [verbs, nouns]


def _stems(rng: random.Random, count: int, sounds: tuple[str, str], suffixes: set[str], taken: set[str]):
    """`count` new pseudo-word stems of 2-3 CV syllables, ending in a vowel so that suffixes attach cleanly.

    A stem is rejected if any of its inflected forms is already a word (``kume`` + ``ma`` vs a stem ``kumema``), so
    every surface form has exactly one analysis.
    """
    onsets, vowels = sounds
    stems: list[str] = []
    while len(stems) < count:
        stem = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((2, 2, 3))))
        forms = {stem + suffix for suffix in suffixes}
        if not forms & taken:
            taken |= forms
            stems.append(stem)
    return tuple(stems)


def build_lexicon() -> Lexicon:
    """The fixed lexicon of both languages; xa and xb use different sounds, so no word is shared by accident."""
    rng = random.Random(_LEXICON_SEED)
    xa_suffixes = ({"", _XA_PLURAL}, set(_XA_VERB.values()), {""}, {""})
    nominal = {n + c for n in _XB_NUMBER.values() for c in _XB_CASE.values()}
    verbal = {t + n for t in _XB_TENSE.values() for n in _XB_VERB_NUMBER.values()}
    xb_suffixes = (nominal, verbal, nominal, {""})
    xa_taken: set[str] = set(w for pair in _FUNCTION_WORDS for w in pair[:1])
    xb_taken: set[str] = set(w for pair in _FUNCTION_WORDS for w in pair[1:])
    sizes = (NUM_NOUNS, NUM_VERBS, NUM_ADJECTIVES, NUM_ADVERBS)
    xa = [_stems(rng, n, ("bdfglmnprstvz", "aeiou"), x, xa_taken) for n, x in zip(sizes, xa_suffixes, strict=True)]
    xb = [_stems(rng, n, ("hjkmnqwxy", "aeiouy"), x, xb_taken) for n, x in zip(sizes, xb_suffixes, strict=True)]
    held = np.random.default_rng(_LEXICON_SEED)
    return Lexicon(
        *xa,
        *xb,
        held_out_adj_noun=held.random((NUM_ADJECTIVES, NUM_NOUNS)) < _HELD_OUT_RATE,
        held_out_verb_object=held.random((NUM_VERBS, NUM_NOUNS)) < _HELD_OUT_RATE,
    )


class _SentenceGenerator:
    """Draws parallel sentences. Each `_*` method returns a pair of word lists (xa words, xb words)."""

    def __init__(self, lexicon: Lexicon, rng: random.Random, held_out: bool):
        self.lex, self.rng, self.held_out = lexicon, rng, held_out

    def sentence(self) -> tuple[str, str]:
        """One sentence pair; held-out mode forces unseen combinations into the first clause."""
        while True:
            xa, xb = self._clause(force_unseen=self.held_out)
            if self.rng.random() < 0.35:
                conj = self.rng.choice(_CONJUNCTIONS)
                xa2, xb2 = self._clause(force_unseen=False)
                xa, xb = [*xa, conj[0], *xa2], [*xb, conj[1], *xb2]
            if len(xa) <= _MAX_WORDS and len(xb) <= _MAX_WORDS:
                return " ".join(xa), " ".join(xb)

    def _clause(self, force_unseen: bool) -> tuple[list[str], list[str]]:
        """``S V O [Adv] [Prep NP]`` -> ``S [NP-loc Postp] O [Adv] V`` (verb-final)."""
        rng = self.rng
        verb, tense, number = rng.randrange(NUM_VERBS), rng.choice(("pres", "past")), rng.choice(("sg", "pl"))
        subj = self._noun_phrase("nom", number, relative=rng.random() < 0.25)
        obj_noun = self._object_for(verb, unseen=force_unseen)
        obj = self._noun_phrase("acc", rng.choice(("sg", "pl")), relative=rng.random() < 0.15,
                                noun=obj_noun, force_unseen_adj=force_unseen)  # fmt: skip
        xa_verb, xb_verb = self._verb(verb, tense, number)
        adverb = self._adverb() if rng.random() < 0.3 else ([], [])
        pp: tuple[list[str], list[str]] = ([], [])
        if rng.random() < 0.3:
            np_xa, np_xb = self._noun_phrase("loc", rng.choice(("sg", "pl")), relative=False)
            adposition = rng.choice(_ADPOSITIONS)
            pp = [adposition[0], *np_xa], [*np_xb, adposition[1]]
        xa = subj[0] + [xa_verb] + obj[0] + adverb[0] + pp[0]
        return xa, subj[1] + pp[1] + obj[1] + adverb[1] + [xb_verb]

    def _adverb(self) -> tuple[list[str], list[str]]:
        i = self.rng.randrange(NUM_ADVERBS)
        return [self.lex.adverbs[i]], [self.lex.xb_adverbs[i]]

    def _noun_phrase(self, case: str, number: str, relative: bool, noun: int | None = None,
                     force_unseen_adj: bool = False) -> tuple[list[str], list[str]]:  # fmt: skip
        """``Det Adj1 Adj2 N [ke VP]`` -> ``N-num-case Adj2-num-case Adj1-num-case [Det] [ke O V]``."""
        rng, lex = self.rng, self.lex
        noun = rng.randrange(NUM_NOUNS) if noun is None else noun
        n_adj = 1 if force_unseen_adj else rng.choice((0, 0, 1, 1, 2))
        adjs = [self._adjective_for(noun, unseen=force_unseen_adj and k == 0) for k in range(n_adj)]
        det = rng.choice((_DEFINITE, _INDEFINITE))
        xa_suffix, xb_suffix = _XA_PLURAL if number == "pl" else "", _XB_NUMBER[number] + _XB_CASE[case]
        xa = [det[0]] + [lex.adjectives[a] for a in adjs] + [lex.nouns[noun] + xa_suffix]
        xb = [lex.xb_nouns[noun] + xb_suffix] + [lex.xb_adjectives[a] + xb_suffix for a in reversed(adjs)]
        xb += [det[1]] if det[1] else []
        if relative:
            rel_xa, rel_xb = self._relative_clause(number)
            xa, xb = xa + rel_xa, xb + rel_xb
        return xa, xb

    def _relative_clause(self, number: str) -> tuple[list[str], list[str]]:
        """Subject relative ``ke V O`` -> ``ke O-acc V``; the verb agrees with the head noun's number."""
        verb, tense = self.rng.randrange(NUM_VERBS), self.rng.choice(("pres", "past"))
        obj = self._noun_phrase("acc", self.rng.choice(("sg", "pl")), relative=False,
                                noun=self._object_for(verb, unseen=False))  # fmt: skip
        xa_verb, xb_verb = self._verb(verb, tense, number)
        return [_RELATIVE[0], xa_verb] + obj[0], [_RELATIVE[1]] + obj[1] + [xb_verb]

    def _verb(self, verb: int, tense: str, number: str) -> tuple[str, str]:
        xa = self.lex.verbs[verb] + _XA_VERB[tense, number]
        return xa, self.lex.xb_verbs[verb] + _XB_TENSE[tense] + _XB_VERB_NUMBER[number]

    def _object_for(self, verb: int, unseen: bool) -> int:
        """A noun whose (verb, object) pair is held out iff `unseen`; outside held-out mode never a held-out pair."""
        return self._draw(NUM_NOUNS, lambda n: self.lex.held_out_verb_object[verb, n] == unseen)

    def _adjective_for(self, noun: int, unseen: bool) -> int:
        return self._draw(NUM_ADJECTIVES, lambda a: self.lex.held_out_adj_noun[a, noun] == unseen)

    def _draw(self, size: int, accept) -> int:
        """Rejection sampling keeps the draw uniform over the accepted lexemes."""
        while True:
            i = self.rng.randrange(size)
            if accept(i):
                return i


def _split(lexicon: Lexicon, seed: int, size: int, held_out: bool) -> datasets.Dataset:
    generator = _SentenceGenerator(lexicon, random.Random(seed), held_out)
    pairs = [generator.sentence() for _ in range(size)]
    return datasets.Dataset.from_dict({"translation": [{SOURCE_LANG: s, TARGET_LANG: t} for s, t in pairs]})


def build_default_corpus(
    seed: int = 0, num_train: int = 30_000, num_validation: int = 1_000, num_test: int = 1_000
) -> datasets.DatasetDict:
    """The default xa -> xb corpus in the WMT14 ``translation`` format; the same `seed` gives the same corpus.

    Validation and test sentences each contain an (adjective, noun) and a (verb, object) pair never seen in train.
    """
    lexicon = build_lexicon()
    # Distinct streams per split, so changing one split's size leaves the others unchanged.
    return datasets.DatasetDict(
        train=_split(lexicon, seed * 3, num_train, held_out=False),
        validation=_split(lexicon, seed * 3 + 1, num_validation, held_out=True),
        test=_split(lexicon, seed * 3 + 2, num_test, held_out=True),
    )
