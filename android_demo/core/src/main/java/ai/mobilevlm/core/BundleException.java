package ai.mobilevlm.core;

/**
 * A bundle, manifest, tokenizer, image or prompt the app cannot use. The message is shown to the user
 * as it is: it names the file, the field and what was expected.
 */
public class BundleException extends Exception {
    public BundleException(String message) {
        super(message);
    }
}
