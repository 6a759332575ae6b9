// The BPE model of the tokenizer: a word (one pre-token, already in the
// model's alphabet) starts as one symbol per character; the adjacent pair with
// the lowest merge rank (leftmost among equals) is merged until no listed pair
// is left. Symbols form a doubly linked list and candidate pairs sit in a
// min-heap keyed by (rank, position), so a word of n characters costs
// O(n log n); entries made stale by an earlier merge are recognised when popped
// and dropped. This is the order tokenizers merges in, so the ids agree.
#include <c10/util/Exception.h>

#include <algorithm>
#include <queue>
#include <tuple>

#include "data/tokenizer_internal.h"

namespace unswag::data::tok {

BpeModel::BpeModel(std::unordered_map<std::string, int32_t> vocab,
                   const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options)
    : vocab_(std::move(vocab)), options_(std::move(options)) {
  token_of_id_.reserve(vocab_.size());
  for (const auto& [token, id] : vocab_) token_of_id_.emplace(id, token);
  std::fill(std::begin(id_of_byte_char_), std::end(id_of_byte_char_), -1);
  for (const auto& [token, id] : vocab_) {
    size_t pos = 0;
    if (token.empty()) continue;
    const char32_t cp = next_code_point(token, pos);
    if (pos == token.size() && cp < 324) id_of_byte_char_[cp] = id;
  }
  merges_.reserve(merges.size());
  auto id_of = [&](const std::string& token, size_t rank) {
    const auto it = vocab_.find(token);
    TORCH_CHECK(it != vocab_.end(), "tokenizer: merge ", rank, " (\"", merges[rank].first, "\" + \"",
                merges[rank].second, "\") needs the token \"", token, "\", which is not in model.vocab");
    return it->second;
  };
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const int32_t merged = id_of(a + b, rank);
    merges_[pair_key(id_of(a, rank), id_of(b, rank))] = Merge{int32_t(rank), merged};
  }
  if (options_.unk_token) {
    const auto it = vocab_.find(*options_.unk_token);
    TORCH_CHECK(it != vocab_.end(), "tokenizer: model.unk_token \"", *options_.unk_token,
                "\" is not in model.vocab");
    unk_id_ = it->second;
  }
}

std::optional<int32_t> BpeModel::token_to_id(std::string_view token) const {
  const auto it = vocab_.find(std::string(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  const auto it = token_of_id_.find(id);
  return it == token_of_id_.end() ? nullptr : &it->second;
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    // Llama 3: a pre-token that is itself a token is not split and re-merged
    // (the merges would not always rebuild it).
    if (const auto id = token_to_id(word)) {
      ids.push_back(*id);
      return;
    }
  }
  const bool cacheable = word.size() < kCacheMaxWordBytes;
  std::string key;
  if (cacheable) {
    key.assign(word);
    std::shared_lock<std::shared_mutex> lock(cache_mutex_);
    const auto it = cache_.find(key);
    if (it != cache_.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = ids.size();
  merge_word(word, ids);
  if (cacheable) {
    std::unique_lock<std::shared_mutex> lock(cache_mutex_);
    if (cache_.size() < kCacheCapacity) cache_.emplace(std::move(key), std::vector<int32_t>(ids.begin() + first, ids.end()));
  }
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& ids) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // neighbours in the list, -1 at the ends
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&](int32_t id) {
    const int32_t index = int32_t(symbols.size());
    if (index > 0) symbols.back().next = index;
    symbols.push_back(Symbol{id, index - 1, -1, true});
  };

  // One symbol per character. A character outside the vocabulary becomes the
  // unknown token (consecutive ones fused into one when fuse_unk), or is
  // dropped when the model has no unknown token, as tokenizers does.
  bool pending_unk = false;
  for (size_t pos = 0; pos < word.size();) {
    const size_t start = pos;
    const char32_t cp = next_code_point(word, pos);
    int32_t id = cp < 324 ? id_of_byte_char_[cp] : -1;
    if (id < 0) {
      const auto it = vocab_.find(std::string(word.substr(start, pos - start)));
      if (it != vocab_.end()) id = it->second;
    }
    if (id >= 0) {
      if (pending_unk) add(*unk_id_), pending_unk = false;
      add(id);
    } else if (unk_id_) {
      if (pending_unk && !options_.fuse_unk) add(*unk_id_);
      pending_unk = true;
    }
  }
  if (pending_unk) add(*unk_id_);

  // Candidate merges, lowest rank first, then leftmost.
  using Candidate = std::tuple<int32_t, int32_t, int32_t>;  // (rank, position, merged id)
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push_pair = [&](int32_t left) {
    const int32_t right = symbols[size_t(left)].next;
    if (right < 0) return;
    const auto it = merges_.find(pair_key(symbols[size_t(left)].id, symbols[size_t(right)].id));
    if (it != merges_.end()) queue.emplace(it->second.rank, left, it->second.merged_id);
  };
  for (int32_t i = 0; i + 1 < int32_t(symbols.size()); ++i) push_pair(i);

  while (!queue.empty()) {
    const auto [rank, left, merged_id] = queue.top();
    queue.pop();
    Symbol& l = symbols[size_t(left)];
    if (!l.alive || l.next < 0) continue;
    // Stale if either side has changed since the candidate was pushed.
    const auto it = merges_.find(pair_key(l.id, symbols[size_t(l.next)].id));
    if (it == merges_.end() || it->second.merged_id != merged_id) continue;
    Symbol& r = symbols[size_t(l.next)];
    l.id = merged_id;
    r.alive = false;
    l.next = r.next;
    if (r.next >= 0) symbols[size_t(r.next)].prev = left;
    if (l.prev >= 0) push_pair(l.prev);
    push_pair(left);
  }
  for (const Symbol& s : symbols)
    if (s.alive) ids.push_back(s.id);
}

}  // namespace unswag::data::tok
