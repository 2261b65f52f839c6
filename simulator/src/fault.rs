//! Scriptable faults: what a test can make the next requests to an endpoint suffer instead
//! of normal processing, and the per-endpoint queues that hold them.
//!
//! Each endpoint has a FIFO of `(fault, remaining count)`. A request arriving at the
//! endpoint takes one use of the fault at the front; when its count reaches zero the next
//! fault applies. `Delay` is the only kind that still processes the request normally.

use std::collections::VecDeque;

use serde::Serialize;

/// The two protocol endpoints the simulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// The app's backend: `POST {base}/sign` (SPEC 4.1).
    Sign,
    /// Entrupy: `POST {api_url}/login` (SPEC 4.2).
    Login,
}

/// A misbehaviour to inflict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status, the raw body (`Content-Type: application/json` when given)
    /// and an optional verbatim `Retry-After` header. A status outside 100..=999 becomes
    /// 500, and a `retry_after` that is not a valid header value is left out.
    Status { status: u16, body: Option<String>, retry_after: Option<String> },
    /// Never answer: hold the connection open until the client gives up or the
    /// simulator shuts down.
    Hang,
    /// Close the connection without any HTTP answer.
    Drop,
    /// A 200 whose body is not valid JSON.
    MalformedJson,
    /// An arbitrary status and raw body (wrong JSON types, NaN, invalid UTF-8, ...).
    Body { status: u16, body: Vec<u8> },
    /// A 200 with a body of about `bytes` bytes (spaces inside a JSON string), streamed
    /// with chunked encoding and no `Content-Length`, so a client with a size cap must
    /// stop reading on its own.
    Oversized { bytes: usize },
    /// A 200 whose `total`-byte body (not a valid answer) arrives at `bytes_per_sec`
    /// (0 counts as 1), streamed: tests a client's whole-request timeout.
    Trickle { bytes_per_sec: u32, total: usize },
    /// Wait this long, then process the request normally.
    Delay { ms: u64 },
    /// Answer with a redirect: this status (a 3xx, though any is sent as given) and a
    /// `Location` header, so a test can check that a client does not follow it.
    Redirect { status: u16, location: String },
}

/// The pending faults of both endpoints.
#[derive(Debug, Default)]
pub(crate) struct FaultQueues {
    sign: VecDeque<(Fault, u32)>,
    login: VecDeque<(Fault, u32)>,
}

impl FaultQueues {
    fn queue(&mut self, ep: Endpoint) -> &mut VecDeque<(Fault, u32)> {
        match ep {
            Endpoint::Sign => &mut self.sign,
            Endpoint::Login => &mut self.login,
        }
    }

    pub fn push(&mut self, ep: Endpoint, fault: Fault, count: u32) {
        if count > 0 {
            self.queue(ep).push_back((fault, count));
        }
    }

    /// Takes one use of the fault at the front of the endpoint's queue.
    pub fn take(&mut self, ep: Endpoint) -> Option<Fault> {
        let q = self.queue(ep);
        let (fault, count) = q.front_mut()?;
        if *count > 1 {
            *count -= 1;
            return Some(fault.clone());
        }
        q.pop_front().map(|(f, _)| f)
    }

    pub fn clear(&mut self) {
        self.sign.clear();
        self.login.clear();
    }

    pub fn pending(&self, ep: Endpoint) -> u32 {
        let q = match ep {
            Endpoint::Sign => &self.sign,
            Endpoint::Login => &self.login,
        };
        q.iter().map(|(_, n)| *n).sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_consumed_in_order() {
        let mut q = FaultQueues::default();
        q.push(Endpoint::Login, Fault::Hang, 2);
        q.push(Endpoint::Login, Fault::Drop, 1);
        q.push(Endpoint::Login, Fault::MalformedJson, 0);
        assert_eq!(q.pending(Endpoint::Login), 3);
        assert_eq!(q.take(Endpoint::Sign), None);
        assert_eq!(q.take(Endpoint::Login), Some(Fault::Hang));
        assert_eq!(q.take(Endpoint::Login), Some(Fault::Hang));
        assert_eq!(q.take(Endpoint::Login), Some(Fault::Drop));
        assert_eq!(q.take(Endpoint::Login), None);
    }
}
