"""Synthetic long-context key-value retrieval data, as readable text and as token ids.

A sample (T tokens, BOS first) reads like:

    <BOS> and so The quiet river follows the old bridge. A small lamp waits near the green
    hill. ... The code for falcon is 5121. ... The pin for violet is 2569. ... What is the
    code for falcon? The code for falcon is 5121. What is the pin for violet? The pin for
    violet is 2569.

Filler sentences carry local structure; facts ("The <attr> for <key> is <value>.") are
scattered at uniformly random depths; the questions at the end ask for some of them and
the answers (the value tokens) must be copied from far back. Keys are distinct within a sample.

Every piece of text is made of whole pre-tokens of the Llama-3 split regex, so the token ids
of a sample are the concatenation of the ids of its pieces. Pieces are encoded once with the
pure-Python BPE (bpe.py); samples are then assembled from piece ids with tensor operations
(on the GPU during training), never by tokenizing text.
"""
import random

import torch

ANIMALS = """falcon tiger otter badger beaver bison camel cobra coyote crane crow deer dingo
dolphin donkey eagle ferret finch gecko gibbon goose gopher heron hippo hyena ibis jackal jaguar
koala lemur leopard lion llama lizard lobster lynx macaw magpie marmot mink mole moose mouse
newt ocelot octopus ostrich owl panda panther parrot pelican penguin pigeon puffin puma python
quail rabbit raccoon raven rhino robin salmon seal shark sheep skunk sloth snail sparrow spider
squid stork swan tapir toad toucan trout turkey turtle viper walrus wasp weasel whale wolf wombat
yak zebra ant bat bear bee cat cow dog duck eel elk fox frog goat hare horse kiwi lamb moth pig
rat wren""".split()
COLOURS = """amber azure beige black blue bronze brown coral cream crimson cyan gold gray green
indigo ivory jade khaki lavender lemon lilac lime magenta maroon mauve mint navy ochre olive
orange peach pink plum purple red rose ruby rust sage scarlet silver tan teal violet white
yellow""".split()
OBJECTS = """anchor anvil arrow axe basket bell blanket bottle bowl box brick broom brush bucket
button cable candle canvas carpet chain chair chisel clock coin comb compass cork cup curtain
desk drum fork funnel globe glove hammer harp helmet hook jar kettle kite knife ladder lamp
lantern lens lock magnet mirror mug nail needle oar pan pencil piano pillow pipe plate pot
pump rake ribbon ring rope ruler saddle saw scarf shovel sieve spoon stamp stool sword table
tent thimble torch towel trumpet tray trunk umbrella vase violin wagon wallet wheel whistle
window wire""".split()
PLANTS = """acorn almond apple apricot bamboo banana basil bean berry birch cactus carrot cedar
cherry clover daisy fern fig garlic ginger grape hazel iris ivy kale lemon lily lotus mango
maple melon moss mushroom oak olive onion orchid palm pea pear pepper pine plum poppy potato
pumpkin radish reed rice rye spruce tulip walnut wheat willow yam""".split()

# Filler vocabulary: deliberately disjoint from the key lists.
F_ADJ = """quiet old small bright dark wide narrow calm busy gentle heavy light long short
warm cold young distant simple steady soft loud slow fast""".split()
F_NOUN = """river bridge hill town road garden valley forest meadow harbor village tower field
path stream cloud boat market station library school cottage island lake shore gate wall
roof street""".split()
F_VERB = """follows crosses watches reaches passes faces meets joins leaves shades circles
touches guards""".split()
F_TIME = """morning evening night day week season spring autumn winter summer""".split()
F_PERSON = """farmer baker painter sailor teacher traveler builder miller weaver gardener
doctor singer""".split()
FILLER_TEMPLATES = [
    " The {a} {n} {v} the {a2} {n2}.",
    " One {a} {n} stands near the {n2}.",
    " Every {t} the {p} walks to the {a} {n}.",
    " The {p} saw a {a} {n} by the {n2}.",
    " In the {t} the {n} is {a} and {a2}.",
    " We went past the {n} and the {a} {n2}.",
    " The {n} was {a}, so the {p} stayed by the {n2}.",
    " Then the {a} {n} {v} a {n2} again.",
]
# Single-token words that pad the start of a sample to an exact length.
FRONT_WORDS = "and so then the it of a to or as in on at by all now here well also too still again".split()
ATTRIBUTES = ["code", "number", "pin", "key"]


def _unique(words):
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


class RetrievalTask:
    """Piece bank (flat token ids + offsets + lengths) and the tensorized sample generator.

    Piece ids index `piece_off`/`piece_len`; piece 0 is empty (length 0) and pads slots.
    """

    def __init__(self, bpe, value_tokens=2, n_fillers=4096, max_key_tokens=3, seed=1234,
                 key_source="lists", value_source="digits"):
        self.bpe = bpe
        self.texts, ids = [""], [[]]  # piece 0: the empty piece

        def add(text, as_bos=False):
            self.texts.append(text)
            ids.append([bpe.bos_id] if as_bos else bpe.encode(text, add_bos=False))
            return len(self.texts) - 1

        self.p_empty = 0
        self.p_bos = add("", as_bos=True)
        rng = random.Random(seed)
        fillers = set()
        while len(fillers) < n_fillers:
            t = rng.choice(FILLER_TEMPLATES)
            a, a2 = rng.sample(F_ADJ, 2)
            n, n2 = rng.sample(F_NOUN, 2)
            fillers.add(t.format(a=a, a2=a2, n=n, n2=n2, v=rng.choice(F_VERB),
                                 t=rng.choice(F_TIME), p=rng.choice(F_PERSON)))
        self.p_fillers = [add(t) for t in sorted(fillers)]
        self.p_front = [add(" " + w) for w in FRONT_WORDS]
        if any(len(ids[p]) != 1 for p in self.p_front):
            raise ValueError("every FRONT_WORDS entry must be one token")
        # Lowercase words that are one token of the tokenizer and appear nowhere else in the task.
        used = set(" ".join(FILLER_TEMPLATES + F_ADJ + F_NOUN + F_VERB + F_TIME + F_PERSON
                            + FRONT_WORDS + ATTRIBUTES + ["what", "is", "for"]).split())
        vocab_words = sorted(t[1:] for t in bpe.vocab if t.startswith("\u0120")
                             and t[1:].isascii() and t[1:].isalpha() and t[1:].islower()
                             and len(t) >= 5 and t[1:] not in used)
        if key_source == "lists":  # animals, colours, objects, plants (1-3 tokens each)
            words = _unique(ANIMALS + COLOURS + OBJECTS + PLANTS)
        else:  # "vocab": the one-token words
            words = vocab_words
        if value_source == "words" and key_source == "vocab":
            words = vocab_words[0::2]  # keys and values: disjoint halves of the vocabulary words
        self.keys = [w for w in words
                     if len(bpe.encode(" " + w, add_bos=False)) <= max_key_tokens]
        self.p_keys = [add(" " + k) for k in self.keys]
        # Values: 4-digit numbers whose digits take exactly `value_tokens` tokens (so every
        # answer, " " + digits, has the same length A = value_tokens + 1).
        if value_source == "words":
            # Values: one-token words that are not keys, so an answer is one token (single-token
            # recall: the needle's value sits right after " is", two tokens after its key).
            keys = set(self.keys)
            self.values = [w for w in vocab_words if w not in keys]
            self.p_values = [add(" " + w) for w in self.values]
            self.answer_len = 1
        else:
            self.values = [v for v in range(1000, 10000)
                           if len(bpe.encode(f" {v}", add_bos=False)) == value_tokens + 1]
            if not self.values:
                raise ValueError(f"no 4-digit value encodes to {value_tokens} digit tokens")
            self.p_values = [add(f" {v}") for v in self.values]
            self.answer_len = value_tokens + 1
        self.p_fact_prefix = [add(f" The {a} for") for a in ATTRIBUTES]
        self.p_q_prefix = [add(f" What is the {a} for") for a in ATTRIBUTES]
        self.p_q_mid = [add(f"? The {a} for") for a in ATTRIBUTES]
        self.p_is = add(" is")
        self.p_dot = add(".")

        flat = [i for seq in ids for i in seq]
        lens = [len(seq) for seq in ids]
        offs = _prefix(lens)
        self.flat = torch.tensor(flat, dtype=torch.long)
        self.piece_len = torch.tensor(lens, dtype=torch.long)
        self.piece_off = torch.tensor(offs, dtype=torch.long)
        filler_lens = [lens[p] for p in self.p_fillers]
        self.min_filler_len, self.max_filler_len = min(filler_lens), max(filler_lens)
        key_max = max(lens[p] for p in self.p_keys)
        attr_max = max(lens[p] for p in self.p_fact_prefix)
        # Worst-case token counts of one fact and one question (used to size samples).
        self.max_fact_len = attr_max + key_max + 1 + self.answer_len + 1
        self.max_question_len = (max(lens[p] for p in self.p_q_prefix) + 2 * key_max
                                 + max(lens[p] for p in self.p_q_mid) + 1 + self.answer_len + 1)
        self.device = torch.device("cpu")
        self.question_every = 128  # one question per this many tokens (shape_for), up to 8
        self._tables()

    def _tables(self):
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)
        self.t_fillers, self.t_front = as_t(self.p_fillers), as_t(self.p_front)
        self.t_keys, self.t_values = as_t(self.p_keys), as_t(self.p_values)
        self.t_fact_prefix, self.t_q_prefix = as_t(self.p_fact_prefix), as_t(self.p_q_prefix)
        self.t_q_mid = as_t(self.p_q_mid)

    def to(self, device):
        self.device = torch.device(device)
        self.flat = self.flat.to(self.device)
        self.piece_len = self.piece_len.to(self.device)
        self.piece_off = self.piece_off.to(self.device)
        self._tables()
        return self

    def shape_for(self, length, max_questions=8, max_facts=32):
        """(max facts, questions) for samples of `length` tokens: sparse facts, >= 1 distractor."""
        questions = max(1, min(max_questions, length // self.question_every))
        facts = max(2, min(max_facts, length // 40, len(self.keys)))
        facts = max(facts, questions + 1)
        room = length - 1 - questions * self.max_question_len - self.max_fact_len * facts
        while room < 0 and questions > 1:  # dense questions (--question-every): fewer fit
            questions -= 1
            facts = max(2, min(max_facts, length // 40, len(self.keys)), questions + 1)
            room = length - 1 - questions * self.max_question_len - self.max_fact_len * facts
        if room < 0:
            raise ValueError(f"length {length} is too short for {facts} facts and "
                             f"{questions} questions")
        return facts, questions

    def sample(self, batch, length, n_facts, n_questions, gen, validate=False):
        """A batch of samples, each exactly `length` tokens.

        Returns a dict: ids [B, T] (long); answer_pos [B, Q, A] positions of the answer tokens
        (the value " dddd" of each question; logits at answer_pos - 1 predict them); keys and
        values [B, Q] (indices into self.keys / self.values) of each question.
        """
        dev, B, T, F, Q = self.device, batch, length, n_facts, n_questions
        rand = lambda *shape: torch.rand(*shape, generator=gen, device=dev)
        randint = lambda n, shape: torch.randint(n, shape, generator=gen, device=dev)
        L = self.piece_len
        # Facts: distinct keys per sample, random values and attributes.        [B, F]
        keys = rand(B, len(self.keys)).argsort(1)[:, :F]
        vals = randint(len(self.values), (B, F))
        attrs = randint(len(ATTRIBUTES), (B, F))
        const = lambda p, shape: torch.full(shape, p, dtype=torch.long, device=dev)
        fact = torch.stack([self.t_fact_prefix[attrs], self.t_keys[keys], const(self.p_is, (B, F)),
                            self.t_values[vals], const(self.p_dot, (B, F))], -1)  # [B, F, 5]
        # Questions about Q of the facts, in random order.                    [B, Q]
        asked = rand(B, F).argsort(1)[:, :Q]
        qk, qv, qa = keys.gather(1, asked), vals.gather(1, asked), attrs.gather(1, asked)
        qkey = self.t_keys[qk]
        question = torch.stack([self.t_q_prefix[qa], qkey, self.t_q_mid[qa], qkey,
                                const(self.p_is, (B, Q)), self.t_values[qv],
                                const(self.p_dot, (B, Q))], -1)  # [B, Q, 7]
        # Filler: whole sentences filling the budget from the end backwards, then single-token
        # words at the front for the remainder (< one sentence).
        budget = T - 1 - L[fact].sum((1, 2)) - L[question].sum((1, 2))  # [B]
        if validate and int(budget.min()) < 0:
            raise ValueError(f"length {T} is too short for {F} facts and {Q} questions")
        S = (T - 1) // self.min_filler_len + 2  # enough sentences (host-side: no GPU sync)
        filler = self.t_fillers[randint(len(self.p_fillers), (B, S))]  # [B, S]
        flen = L[filler]
        from_end = flen.flip(1).cumsum(1).flip(1)  # tokens of sentences j..S-1
        kept = from_end <= budget[:, None]
        filler = torch.where(kept, filler, torch.zeros_like(filler))
        n_kept = kept.sum(1)  # [B]
        n_front = budget - (flen * kept).sum(1)  # [B], < max_filler_len
        # Each fact goes into a uniformly random gap between kept sentences: gap g sits just
        # before sentence g (g = S: after the last one). Sort keys: sentence j -> 2j + 1,
        # a fact in gap g -> 2g.
        gap = (S - n_kept)[:, None] + (rand(B, F) * (n_kept + 1)[:, None]).long()
        gap = torch.minimum(gap, torch.full_like(gap, S))
        sort_key = torch.cat([(2 * torch.arange(S, device=dev) + 1).expand(B, S), 2 * gap], 1)
        order = sort_key.argsort(1)  # [B, S + F]
        slots = torch.cat([torch.nn.functional.pad(filler[..., None], (0, 4)), fact], 1)
        slots = slots.gather(1, order[..., None].expand(-1, -1, 5))  # [B, S + F, 5]
        R = self.max_filler_len
        front = self.t_front[randint(len(self.p_front), (B, R))]
        front = torch.where(torch.arange(R, device=dev)[None] < n_front[:, None], front,
                            torch.zeros_like(front))
        pieces = torch.cat([const(self.p_bos, (B, 1)), front, slots.flatten(1),
                            question.flatten(1)], 1)  # [B, P]
        plen = L[pieces]
        ends = plen.cumsum(1)
        starts = ends - plen
        if validate and not bool((ends[:, -1] == T).all()):
            raise AssertionError("sample assembly produced the wrong length")
        # Token at position p: piece j with starts[j] <= p < ends[j] (empty pieces skipped).
        pos = torch.arange(T, device=dev).expand(B, T).contiguous()
        j = torch.searchsorted(ends, pos, right=True)
        ids = self.flat[self.piece_off[pieces.gather(1, j)] + pos - starts.gather(1, j)]
        # Answer tokens: piece 5 of each question.
        value_piece = 1 + R + 5 * (S + F) + 7 * torch.arange(Q, device=dev) + 5  # [Q]
        answer_start = starts[:, value_piece]  # [B, Q]
        answer_pos = answer_start[..., None] + torch.arange(self.answer_len, device=dev)
        # Needle: where the asked fact's value (its piece 3) starts.
        fact_slot = order.argsort(1)[:, S:]  # [B, F] slot index of each fact after sorting
        needle = starts.gather(1, 1 + R + 5 * fact_slot + 3).gather(1, asked)  # [B, Q]
        return {"ids": ids, "answer_pos": answer_pos, "needle_pos": needle, "keys": qk,
                "values": qv, "question_attrs": qa}

    def prompt(self, length, gen, n_facts=None):
        """One prompt of exactly `length` tokens (BOS included) ending with "... is", and its
        expected answer. Returns a dict with ids, text (without BOS), answer_ids, answer_text,
        needle_position (token index where the fact's value " dddd" starts) and key/value."""
        T = length + self.answer_len + 1
        facts, _ = self.shape_for(T, max_questions=1)
        batch = self.sample(1, T, n_facts or facts, 1, gen, validate=True)
        ids = batch["ids"][0].tolist()
        start = int(batch["answer_pos"][0, 0, 0])
        prompt, answer = ids[:start], ids[start:start + self.answer_len]
        key = self.keys[int(batch["keys"][0, 0])]
        value = self.values[int(batch["values"][0, 0])]
        return {"length": len(prompt), "ids": prompt, "text": self.bpe.decode(prompt[1:]),
                "answer_ids": answer, "answer_text": self.bpe.decode(answer), "key": key,
                "value": value, "needle_position": int(batch["needle_pos"][0, 0])}


def _prefix(lens):
    out, acc = [], 0
    for n in lens:
        out.append(acc)
        acc += n
    return out


def self_check(task, tokenizer_path, n_samples=300, lengths=(64, 96, 200, 512), seed=7):
    """Verifies that assembled ids equal the tokenization of the decoded text.

    Always checks against the pure-Python encoder (bpe.py); also against the `tokenizers`
    library where it is installed. Returns a dict report; report["ok"] is False on mismatch.
    """
    from bpe import check_against_tokenizers
    gen = torch.Generator(device=task.device).manual_seed(seed)
    texts, id_lists, own_bad = [], [], 0
    per_length = max(1, n_samples // len(lengths))
    for T in lengths:
        F, Q = task.shape_for(T)
        batch = task.sample(per_length, T, F, Q, gen, validate=True)
        for row in batch["ids"].tolist():
            text = task.bpe.decode(row[1:])
            texts.append(text)
            id_lists.append(row)
            own_bad += task.bpe.encode(text) != row
    checked, bad = check_against_tokenizers(tokenizer_path, texts, id_lists)
    report = {"samples": len(texts), "own_encoder_mismatches": own_bad,
              "tokenizers_checked": checked, "tokenizers_mismatches": len(bad)}
    report["ok"] = own_bad == 0 and not bad
    if bad:
        report["first_mismatch_text"] = texts[bad[0]][:300]
    return report
