// C++ unit tests of the transfer engine through its public header only: two engines in one
// process over TCP on 127.0.0.1 (no Python, no torch).
#include <poll.h>

#include <chrono>
#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

#include "pdserve/transfer/engine.h"
#include "transfer_check.h"

using namespace pdserve::transfer;

namespace {

uint64_t addr_of(std::vector<uint8_t>& v, size_t offset = 0) {
  return reinterpret_cast<uint64_t>(v.data() + offset);
}

struct Pair {
  TransferEngine sender{EngineConfig{}};
  TransferEngine receiver{EngineConfig{}};
  std::vector<uint8_t> src = std::vector<uint8_t>(1 << 20);
  std::vector<uint8_t> dst = std::vector<uint8_t>(1 << 20, 0);
  Pair() {
    std::iota(src.begin(), src.end(), uint8_t{1});
    sender.register_memory(addr_of(src), src.size());
    receiver.register_memory(addr_of(dst), dst.size());
    sender.connect(receiver.address());
  }
};

}  // namespace

TRANSFER_TEST(pieces_land_exactly_and_are_counted) {
  Pair p;
  p.receiver.expect("r", 3000, 10.0);
  Ticket t = p.sender.send(p.receiver.address(), "r",
                           {{addr_of(p.src), addr_of(p.dst, 100), 1000},
                            {addr_of(p.src, 5000), addr_of(p.dst, 9000), 2000}});
  SendResult s = p.sender.wait(t, 10.0);
  CHECK(s.status == Status::kDone);
  CHECK(s.nbytes == 3000);
  RecvResult r = p.receiver.wait_recv("r", 10.0);
  CHECK(r.status == Status::kDone);
  CHECK(r.nbytes_received == 3000);
  CHECK(std::memcmp(p.dst.data() + 100, p.src.data(), 1000) == 0);
  CHECK(std::memcmp(p.dst.data() + 9000, p.src.data() + 5000, 2000) == 0);
  CHECK(p.dst[99] == 0 && p.dst[1100] == 0 && p.dst[11000] == 0);
  CHECK(p.sender.stats().total.bytes_sent == 3000);
  CHECK(p.receiver.stats().peers.at(p.sender.address()).bytes_received == 3000);
}

TRANSFER_TEST(out_of_range_destination_is_refused) {
  Pair p;
  p.receiver.expect("oob", 64, 10.0);
  Ticket t = p.sender.send(p.receiver.address(), "oob",
                           {{addr_of(p.src), addr_of(p.dst, p.dst.size() - 32), 64}});
  CHECK(p.sender.wait(t, 10.0).status == Status::kFailed);
  CHECK(p.receiver.wait_recv("oob", 10.0).status == Status::kFailed);
  CHECK(p.dst[p.dst.size() - 32] == 0);
}

TRANSFER_TEST(unexpected_request_is_refused) {
  Pair p;
  Ticket t = p.sender.send(p.receiver.address(), "ghost", {{addr_of(p.src), addr_of(p.dst), 64}});
  SendResult s = p.sender.wait(t, 10.0);
  CHECK(s.status == Status::kFailed);
  CHECK(s.error.find("not expected") != std::string::npos);
  CHECK(p.dst[0] == 0);
}

TRANSFER_TEST(argument_errors_throw) {
  Pair p;
  CHECK_THROWS(p.sender.register_memory(addr_of(p.src, 10), 10), std::invalid_argument);
  CHECK_THROWS(p.sender.register_memory(0x1000, 0), std::invalid_argument);
  CHECK_THROWS(p.sender.register_memory(0x1000, 16, 0), std::invalid_argument);
  CHECK_THROWS(p.sender.send(p.receiver.address(), "x", {}), std::invalid_argument);
  CHECK_THROWS(p.sender.send(p.receiver.address(), "x", {{addr_of(p.src), 0, 0}}),
               std::invalid_argument);
  CHECK_THROWS(p.sender.send("127.0.0.1:9", "x", {{addr_of(p.src), 0, 8}}), std::invalid_argument);
  SendOptions gpu;
  gpu.stream = 1;
  CHECK_THROWS(p.sender.send(p.receiver.address(), "x", {{addr_of(p.src), 0, 8}}, gpu),
               std::invalid_argument);
  CHECK_THROWS(p.receiver.expect("x", 0, 1.0), std::invalid_argument);
  CHECK_THROWS(p.receiver.wait_recv("unknown", 0.0), std::invalid_argument);
  CHECK_THROWS(make_transport("carrier-pigeon", {}), std::invalid_argument);
}

TRANSFER_TEST(expect_deadline_fires) {
  Pair p;
  p.receiver.expect("slow", 10, 0.1);
  auto t0 = std::chrono::steady_clock::now();
  RecvResult r = p.receiver.wait_recv("slow", 5.0);
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(r.status == Status::kTimedOut);
  CHECK(waited > 0.05 && waited < 2.0);
}

TRANSFER_TEST(abort_propagates_to_the_peer) {
  Pair p;
  p.receiver.expect("ab", 100, 10.0);
  p.sender.abort("ab", "cancelled");
  bool aborted = false;
  for (int i = 0; i < 500 && !aborted; ++i) {
    auto r = p.receiver.poll_recv("ab");
    aborted = r && r->status == Status::kAborted;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  CHECK(aborted);
  // The sender aborted "ab" itself: a later push of it ends at once, nothing goes out.
  Ticket t = p.sender.send(p.receiver.address(), "ab", {{addr_of(p.src), addr_of(p.dst), 100}});
  CHECK(p.sender.wait(t, 10.0).status == Status::kAborted);
  CHECK(p.receiver.stats().total.bytes_rejected == 0);
  CHECK(p.dst[0] == 0);
}

TRANSFER_TEST(completion_fd_signals_watched_work_only) {
  Pair p;
  int fd = p.receiver.completion_fd();
  int sender_fd = p.sender.completion_fd();
  // Work nobody watches finishes without a completion.
  p.receiver.expect("quiet", 10, 10.0);
  Ticket quiet =
      p.sender.send(p.receiver.address(), "quiet", {{addr_of(p.src), addr_of(p.dst), 10}});
  CHECK(p.sender.wait(quiet, 10.0).status == Status::kDone);
  CHECK(p.receiver.wait_recv("quiet", 10.0).status == Status::kDone);
  p.sender.watch(quiet);  // terminal already: nothing is queued
  pollfd pfds[2] = {{fd, POLLIN, 0}, {sender_fd, POLLIN, 0}};
  CHECK(::poll(pfds, 2, 0) == 0);
  CHECK(p.receiver.drain_completions().empty() && p.sender.drain_completions().empty());
  // A watched receive completes through the fd.
  p.receiver.expect("c", 10, 10.0);
  p.receiver.watch_recv("c");
  p.sender.send(p.receiver.address(), "c", {{addr_of(p.src), addr_of(p.dst) + 16, 10}});
  pollfd pfd{fd, POLLIN, 0};
  CHECK(::poll(&pfd, 1, 5000) == 1);
  std::vector<Completion> done = p.receiver.drain_completions();
  CHECK(done.size() == 1);
  CHECK(!done[0].is_send && done[0].recv.request_id == "c" && done[0].recv.status == Status::kDone);
  CHECK(p.receiver.drain_completions().empty());
}

TRANSFER_TEST(close_fails_pending_work_and_is_idempotent) {
  Pair p;
  p.receiver.expect("pending", 10, 0.0);
  p.receiver.close();
  p.receiver.close();
  CHECK(p.receiver.wait_recv("pending", 1.0).status == Status::kFailed);
  CHECK_THROWS(p.receiver.expect("later", 10, 0.0), TransferError);
}

TRANSFER_TEST(concurrent_senders_and_aborts_all_settle) {
  // 4 threads push 40 requests each (2 batches per request, some spanning several messages);
  // every 5th request is aborted by the receiver mid-way, some others by the sender. Every ticket
  // and receive must settle, and every request that completed must hold exactly its bytes.
  EngineConfig small;
  small.transport.max_message_nbytes = 64 << 10;
  TransferEngine sender(small), receiver(EngineConfig{});
  constexpr int kThreads = 4, kPerThread = 40;
  constexpr size_t kSlot = 96 << 10;
  std::vector<uint8_t> src(kThreads * kPerThread * kSlot), dst(src.size(), 0);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 131 + 7);
  sender.register_memory(addr_of(src), src.size());
  receiver.register_memory(addr_of(dst), dst.size());
  sender.connect(receiver.address());
  for (int r = 0; r < kThreads * kPerThread; ++r) {
    receiver.expect("q" + std::to_string(r), kSlot, 20.0);
  }
  std::vector<std::thread> threads;
  std::vector<std::vector<Ticket>> tickets(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        int r = t * kPerThread + i;
        size_t base = r * kSlot, half = kSlot / 2;
        std::string rid = "q" + std::to_string(r);
        tickets[t].push_back(
            sender.send(receiver.address(), rid, {{addr_of(src, base), addr_of(dst, base), half}}));
        if (r % 5 == 0) receiver.abort(rid, "test abort");
        if (r % 7 == 3) sender.abort(rid, "sender abort");
        tickets[t].push_back(
            sender.send(receiver.address(), rid,
                        {{addr_of(src, base + half), addr_of(dst, base + half), half}}));
      }
    });
  }
  for (auto& th : threads) th.join();
  for (auto& list : tickets) {
    for (Ticket t : list) CHECK(sender.wait(t, 20.0).status != Status::kPending);
  }
  int done = 0;
  for (int r = 0; r < kThreads * kPerThread; ++r) {
    RecvResult res = receiver.wait_recv("q" + std::to_string(r), 20.0);
    CHECK(res.status != Status::kPending);
    if (r % 5 == 0) {
      CHECK(res.status == Status::kAborted);
    } else if (r % 7 == 3) {
      // The sender's abort may arrive after the bytes it would have stopped.
      CHECK(res.status == Status::kAborted || res.status == Status::kDone);
      if (res.status == Status::kDone) {
        CHECK(std::memcmp(dst.data() + r * kSlot, src.data() + r * kSlot, kSlot) == 0);
      }
    } else {
      CHECK(res.status == Status::kDone);
      CHECK(std::memcmp(dst.data() + r * kSlot, src.data() + r * kSlot, kSlot) == 0);
      ++done;
    }
  }
  int untouched = 0;
  for (int r = 0; r < kThreads * kPerThread; ++r) untouched += (r % 5 != 0 && r % 7 != 3) ? 1 : 0;
  CHECK(done == untouched);
  CHECK(receiver.stats().num_pending_recvs == 0);
  CHECK(sender.stats().num_pending_tickets == 0);
}

namespace {

EngineConfig with_token(const std::string& token) {
  EngineConfig config;
  config.transport.cluster_token = token;
  return config;
}

// The TransferError connect() throws, or "" when it connects.
std::string connect_error(TransferEngine& sender, const std::string& peer) {
  try {
    sender.connect(peer, 5.0);
  } catch (const TransferError& e) {
    return e.what();
  }
  return "";
}

// Whether sender (connected to receiver already) moves 64 bytes into receiver's dst under rid.
bool exchanges_bytes(TransferEngine& sender, TransferEngine& receiver, const std::string& rid,
                     std::vector<uint8_t>& src, std::vector<uint8_t>& dst) {
  receiver.expect(rid, 64, 10.0);
  Ticket t = sender.send(receiver.address(), rid, {{addr_of(src), addr_of(dst), 64}});
  return sender.wait(t, 10.0).status == Status::kDone &&
         receiver.wait_recv(rid, 10.0).status == Status::kDone &&
         std::memcmp(src.data(), dst.data(), 64) == 0;
}

}  // namespace

TRANSFER_TEST(same_cluster_token_connects_and_exchanges_bytes) {
  TransferEngine sender(with_token("s3cret")), receiver(with_token("s3cret"));
  std::vector<uint8_t> src(64, 7), dst(64, 0);
  sender.register_memory(addr_of(src), src.size());
  receiver.register_memory(addr_of(dst), dst.size());
  CHECK(connect_error(sender, receiver.address()).empty());
  CHECK(exchanges_bytes(sender, receiver, "tok", src, dst));
}

TRANSFER_TEST(wrong_or_missing_cluster_token_is_refused_at_connect) {
  TransferEngine receiver(with_token("s3cret"));
  TransferEngine wrong(with_token("s3creT")), none{EngineConfig{}};
  for (TransferEngine* sender : {&wrong, &none}) {
    std::string error = connect_error(*sender, receiver.address());
    CHECK(error.find("peer " + receiver.address() + " refused the connection") !=
          std::string::npos);
    CHECK(error.find("the cluster tokens differ") != std::string::npos);
    CHECK(error.find("--cluster-token") != std::string::npos);
    CHECK(error.find("s3cre") == std::string::npos);  // neither token is echoed
    CHECK(!sender->connected(receiver.address()));
  }
  CHECK(connect_error(none, receiver.address()).find("this engine has none") != std::string::npos);
  // The refusals left the receiver serving peers with the token.
  TransferEngine right(with_token("s3cret"));
  std::vector<uint8_t> src(64, 9), dst(64, 0);
  right.register_memory(addr_of(src), src.size());
  receiver.register_memory(addr_of(dst), dst.size());
  CHECK(connect_error(right, receiver.address()).empty());
  CHECK(exchanges_bytes(right, receiver, "after-refusals", src, dst));
}

TRANSFER_TEST(receiver_without_cluster_token_accepts_any) {
  TransferEngine sender(with_token("s3cret")), receiver{EngineConfig{}};
  std::vector<uint8_t> src(64, 5), dst(64, 0);
  sender.register_memory(addr_of(src), src.size());
  receiver.register_memory(addr_of(dst), dst.size());
  CHECK(connect_error(sender, receiver.address()).empty());
  CHECK(exchanges_bytes(sender, receiver, "open", src, dst));
}

TRANSFER_TEST(cluster_token_longer_than_1024_bytes_is_refused_at_construction) {
  std::string too_long(1025, 'x'), longest_token(1024, 'x');
  CHECK_THROWS(TransferEngine{with_token(too_long)}, std::invalid_argument);
  TransferEngine sender(with_token(longest_token)), receiver(with_token(longest_token));
  CHECK(connect_error(sender, receiver.address()).empty());  // the longest token fits the HELLO
}

int main() { return transfer_check::run_all(); }
