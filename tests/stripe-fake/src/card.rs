//! Stripe's test-mode PaymentMethods and what confirming with each does, so that the demo behaves
//! the same against the fake and against real Stripe in test mode.

/// What happens when a PaymentIntent is confirmed with a given PaymentMethod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeed,
    /// A 402 `card_error`: `code`, `decline_code`, message.
    Decline {
        code: &'static str,
        decline_code: &'static str,
        message: &'static str,
    },
    /// 3-D Secure: `requires_action` until the customer authenticates.
    RequireAction,
}

const DECLINED: &str = "Your card was declined.";

/// The outcome of a test PaymentMethod, or `None` when Stripe would answer "No such PaymentMethod".
pub fn outcome(payment_method: &str) -> Option<Outcome> {
    let decline = |code, decline_code, message| Outcome::Decline {
        code,
        decline_code,
        message,
    };
    Some(match payment_method {
        "pm_card_visa"
        | "pm_card_visa_debit"
        | "pm_card_mastercard"
        | "pm_card_amex"
        | "pm_card_discover"
        | "pm_card_us"
        | "pm_card_threeDSecureOptional" => Outcome::Succeed,
        "pm_card_chargeDeclined" | "pm_card_visa_chargeDeclined" | "pm_card_chargeCustomerFail" => {
            decline("card_declined", "generic_decline", DECLINED)
        }
        "pm_card_chargeDeclinedInsufficientFunds"
        | "pm_card_visa_chargeDeclinedInsufficientFunds" => decline(
            "card_declined",
            "insufficient_funds",
            "Your card has insufficient funds.",
        ),
        "pm_card_chargeDeclinedLostCard" | "pm_card_visa_chargeDeclinedLostCard" => {
            decline("card_declined", "lost_card", DECLINED)
        }
        "pm_card_chargeDeclinedStolenCard" | "pm_card_visa_chargeDeclinedStolenCard" => {
            decline("card_declined", "stolen_card", DECLINED)
        }
        "pm_card_chargeDeclinedExpiredCard" | "pm_card_visa_chargeDeclinedExpiredCard" => {
            decline("expired_card", "expired_card", "Your card has expired.")
        }
        "pm_card_chargeDeclinedIncorrectCvc" | "pm_card_visa_chargeDeclinedIncorrectCvc" => {
            decline(
                "incorrect_cvc",
                "incorrect_cvc",
                "Your card's security code is incorrect.",
            )
        }
        "pm_card_chargeDeclinedProcessingError" | "pm_card_visa_chargeDeclinedProcessingError" => {
            decline(
                "processing_error",
                "processing_error",
                "An error occurred while processing your card. Try again in a little bit.",
            )
        }
        "pm_card_authenticationRequired"
        | "pm_card_threeDSecure2Required"
        | "pm_card_authenticationRequiredOnSetup" => Outcome::RequireAction,
        _ => return None,
    })
}
