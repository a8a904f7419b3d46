//! The one test processor: what it does with a document is scripted per media type (what the
//! configured processor does, a panic, waiting for a gate the test opens, or hanging for
//! ever).

use std::sync::Arc;

use futures::future::BoxFuture;
use medrelay::model::DocumentResult;
use medrelay::processor::{CallBudget, Document, MediaType, ProcessError, Processor};
use medrelay::state::AppState;
use tokio::sync::Semaphore;

/// What the processor does with a document.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// What the configured processor (the sandboxed local one) does.
    Local,
    /// Panics, outside any parser's containment: an unmanaged failure.
    Panic,
    /// Waits until the test opens the gate, then does what the configured processor does.
    Gated,
    /// Never finishes.
    Hang,
}

pub struct Scripted {
    rules: Vec<(MediaType, Step)>,
    otherwise: Step,
    gate: Arc<Semaphore>,
    /// The processor the app was configured with, set by [`Scripted::install`].
    configured: Option<Arc<dyn Processor>>,
}

impl Scripted {
    /// Does `otherwise` with every document not named by [`Scripted::on`].
    pub fn new(otherwise: Step) -> Scripted {
        Scripted {
            rules: Vec::new(),
            otherwise,
            gate: Arc::new(Semaphore::new(0)),
            configured: None,
        }
    }

    pub fn on(mut self, media_type: MediaType, step: Step) -> Scripted {
        self.rules.push((media_type, step));
        self
    }

    /// Installs the processor in `state`; returns the gate that [`Step::Gated`] waits for
    /// (`add_permits(n)` lets `n` documents through).
    pub fn install(mut self, state: &mut AppState) -> Arc<Semaphore> {
        let gate = self.gate.clone();
        self.configured = Some(state.processor.clone());
        state.processor = Arc::new(self);
        gate
    }
}

impl Processor for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn process<'a>(
        &'a self,
        document: Document,
        budget: &'a dyn CallBudget,
    ) -> BoxFuture<'a, Result<DocumentResult, ProcessError>> {
        let step = self
            .rules
            .iter()
            .find(|(m, _)| *m == document.media_type)
            .map_or(self.otherwise, |(_, s)| *s);
        Box::pin(async move {
            match step {
                Step::Local => {}
                Step::Panic => panic!("a bug in a processor"),
                Step::Gated => {
                    let _permit = self.gate.acquire().await.expect("the gate stays open");
                }
                Step::Hang => futures::future::pending::<()>().await,
            }
            let configured = self.configured.as_ref().expect("installed");
            configured.process(document, budget).await
        })
    }
}
