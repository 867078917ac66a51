//! Request and response sizes and the request's end, as Istio measures them: `istio_request_bytes` and
//! `istio_response_bytes` are the total size of each message (header names and values, as Envoy's header byte size
//! counts them, plus body and trailers), and the duration runs until the last byte of the response.
//!
//! [`Counted`] adds the bytes of a request body to a shared count as they pass; [`Measured`] wraps a response
//! body and calls its `on_end` once, with the body's bytes, when the body ends, fails, or is dropped (the client
//! went away, or hyper finished without polling an empty body).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use hyper::body::{Body, Buf, Frame, SizeHint};
use hyper::header::HeaderMap;

/// Header names and values, byte for byte (Envoy's `HeaderMap::byteSize`).
pub fn header_bytes(headers: &HeaderMap) -> u64 {
    headers.iter().map(|(name, value)| (name.as_str().len() + value.len()) as u64).sum()
}

fn frame_bytes<D: Buf>(frame: &Frame<D>) -> u64 {
    if let Some(data) = frame.data_ref() {
        return data.remaining() as u64;
    }
    frame.trailers_ref().map_or(0, header_bytes)
}

/// A request body whose bytes are added to `count` as they are read.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            self.count.fetch_add(frame_bytes(frame), Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type OnEnd = Box<dyn FnOnce(u64) + Send>;

/// A response body that reports its end once (see the module's doc).
pub struct Measured<B> {
    inner: B,
    bytes: u64,
    on_end: Option<OnEnd>,
}

impl<B> Measured<B> {
    pub fn new(inner: B, on_end: impl FnOnce(u64) + Send + 'static) -> Self {
        Self { inner, bytes: 0, on_end: Some(Box::new(on_end)) }
    }

    fn end(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.bytes);
        }
    }
}

impl<B: Body + Unpin> Body for Measured<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.bytes += frame_bytes(frame);
                if self.inner.is_end_stream() {
                    self.end();
                }
            }
            Poll::Ready(None | Some(Err(_))) => self.end(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Measured<B> {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Bytes;

    #[tokio::test]
    async fn sizes_and_one_end() {
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::data(Bytes::from_static(b" world"))),
            Ok(Frame::trailers(trailers)),
        ];
        let seen = ended.clone();
        let body = Measured::new(StreamBody::new(tokio_stream::iter(frames)), move |n| seen.lock().unwrap().push(n));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.to_bytes(), "hello world");
        assert_eq!(*ended.lock().unwrap(), [11 + "grpc-status".len() as u64 + 1], "once, with the trailers");

        // Dropped before its end (the client went away): reported once with what was sent.
        let seen = ended.clone();
        drop(Measured::new(Full::new(Bytes::from_static(b"abc")), move |n| seen.lock().unwrap().push(n)));
        assert_eq!(ended.lock().unwrap().last(), Some(&0));
        assert_eq!(ended.lock().unwrap().len(), 2);

        let count = Arc::new(AtomicU64::new(10));
        let counted = Counted::new(Full::new(Bytes::from_static(b"abcd")), count.clone());
        counted.collect().await.unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 14);
    }

    #[test]
    fn header_bytes_are_names_and_values() {
        let mut h = HeaderMap::new();
        h.insert("host", "a.b".parse().unwrap());
        h.append("x", "1".parse().unwrap());
        h.append("x", "22".parse().unwrap());
        assert_eq!(header_bytes(&h), 4 + 3 + 1 + 1 + 1 + 2);
    }
}
